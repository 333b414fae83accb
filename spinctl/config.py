"""Every option of score, select, patch and eval, defined once: type, default, check, help.

The CLI flags (cli.py, `with_options`), the spin.yaml sections (runconfig.py) and the README's
option tables (tests/test_options.py) are derived from these dataclasses. A field is an option
when it carries `option(...)` metadata; the others (model, data, output, ...) are inputs the
commands take as arguments. Light on purpose: `spinctl --help` builds the flags from here
without importing torch or numba.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from spinctl.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = "auto, cpu, cuda or cuda:N"


class Method(str, Enum):
    SNIP = "snip"  # |W| ⊙ Σ_s |∇_W L_s|: per-sample gradients
    WANDA = "wanda"  # |W| · ‖x‖: activation norms, forward only


class Mode(str, Enum):
    paper = "paper"  # (∩ top_q(C_i)) \ top_p(R)
    reference = "reference"  # the official code's positional AND, for reproducing its numbers


class JudgeName(str, Enum):
    keyword = "keyword"
    model = "model"


# ---- value checks: each returns the normalised value or raises ValueError(what is expected) ----


def check_text(v):
    if isinstance(v, str) and v.strip():
        return v
    raise ValueError("must be a non-empty string")


def check_flag(v):
    if isinstance(v, bool):  # not 'false': a non-empty string is truthy, and in_place: 'false' patched in place
        return v
    raise ValueError("must be true or false (unquoted)")


def check_integer(low: int, none_ok: bool = False) -> Callable:
    def check(v):
        if none_ok and v is None:
            return None
        if isinstance(v, int) and not isinstance(v, bool) and v >= low:
            return v
        raise ValueError(f"must be an integer >= {low}" + (" (or unset)" if none_ok else ""))

    return check


def check_number(low: float, high: float, low_open: bool = False) -> Callable:
    def check(v):
        x = v
        if isinstance(v, str):  # PyYAML (YAML 1.1) reads 5e-7, without a dot, as a string
            try:
                x = float(v)
            except ValueError:
                x = None
        if (
            isinstance(x, (int, float))
            and not isinstance(x, bool)
            and math.isfinite(x)
            and (low < x if low_open else low <= x)
            and x <= high
        ):
            return float(x)
        raise ValueError(f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}]")

    return check


def check_choice(*values: str, enum: type[Enum] | None = None) -> Callable:
    def check(v):
        v = v.value if isinstance(v, Enum) else v
        if isinstance(v, str) and v in values:
            return enum(v) if enum else v
        raise ValueError(f"must be one of {', '.join(values)}")

    return check


def check_enum(enum: type[Enum]) -> Callable:
    return check_choice(*(m.value for m in enum), enum=enum)


def check_path(v):
    """An optional path: None stays unset."""
    if v is None:
        return None
    if isinstance(v, (str, Path)) and str(v).strip():
        return Path(v)
    raise ValueError("must be a path")


def check_batch(v):
    if v in (None, "auto"):  # auto: the planner picks
        return None
    if isinstance(v, str) and v.isdigit():  # the CLI passes --batch-size as text (it takes `auto` too)
        v = int(v)
    return check_integer(1)(v)


SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def check_size(v):
    """A byte count: an integer, or a number with a unit (3GB, 2.5GiB, 512MiB); None stays unset."""
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**63):
        return v
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", v, re.IGNORECASE) if isinstance(v, str) else None
    unit = (m.group(2) or "").upper() if m else ""
    unit = unit + "B" if unit and not unit.endswith("B") else unit  # 3G = 3GB
    n = float(m.group(1)) * SIZE_UNITS[unit] if m and unit in SIZE_UNITS else 0.0  # inf for 400 digits
    if 1 <= n < 2**63:  # no machine has 8 EiB; past it the byte count overflows C integers
        return int(n)
    raise ValueError("must be a size such as 3GB, 2.5GiB or 512MiB")


def check_device(v):
    if isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):  # torch.device("tpu") fails deep in a load
        return v
    raise ValueError(f"must be {DEVICES}")


def check_targets(v):
    from spinctl.scoring.targets import parse_spec

    if not isinstance(v, str):
        raise ValueError("must be mlp, attn, all or re:REGEX")
    try:
        parse_spec(v)
    except UsageError as e:
        raise ValueError(str(e).removeprefix(f"--targets {v!r}: ")) from None
    return v


# ---- option metadata ------------------------------------------------------------------------


@dataclass(frozen=True)
class Opt:
    help: str
    check: Callable[[Any], Any]
    metavar: str = ""  # the README's value placeholder (`--nsamples N`); empty for a flag
    cli: Any = None  # the Typer type where the field's own type is not one (enums, `auto`)
    yaml: bool = True  # also a key of its spin.yaml section
    relative: bool = False  # a path: relative to spin.yaml when given there
    readme_default: str | None = None  # shown instead of the default (e.g. "all" for None)


def option(default, help: str, check: Callable, **kw) -> Any:
    return field(default=default, metadata={"opt": Opt(help, check, **kw)})


def options(cls) -> list[dataclasses.Field]:
    """The fields of a config class that are options, in definition order."""
    return [f for f in dataclasses.fields(cls) if "opt" in f.metadata]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


class OptionError(UsageError):
    """An option's value is out of range, or clashes with another option's.

    `problem` may name other options as {field}; the message names them the way the user gave
    them: flags on the command line (str), YAML keys from spin.yaml (`render`)."""

    def __init__(self, name: str, value: Any, problem: str):
        self.name, self.value, self.problem = name, value, problem
        super().__init__(self.render(flag_name))

    def render(self, namer: Callable[[str], str]) -> str:
        """The message with options named by `namer` (field name -> flag or YAML key)."""
        value = "" if self.value is None else " " + short(self.value)
        return f"{namer(self.name)}{value}: {self.problem.format_map(_Names(namer))}"


class _Names(dict):
    def __init__(self, namer):
        super().__init__()
        self.namer = namer

    def __missing__(self, key):
        return self.namer(key)


def short(v) -> str:
    text_ = v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else repr(v)
    return text_ if len(text_) <= 60 else text_[:57] + "..."


def validate(obj) -> None:
    """Run every option's check on a (frozen) config, storing the normalised values."""
    for f in options(type(obj)):
        value = getattr(obj, f.name)
        try:
            object.__setattr__(obj, f.name, f.metadata["opt"].check(value))
        except ValueError as e:
            raise OptionError(f.name, value, str(e)) from None


def values(obj) -> dict[str, Any]:
    """The option values of a config, by field name."""
    return {f.name: getattr(obj, f.name) for f in options(type(obj))}


# ---- the configs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreConfig:
    """One scoring run: the model, one calibration set, the score file, and the scoring options."""

    model: Path
    data: str  # a CSV/JSONL path or builtin:NAME
    output: Path
    method: Method = option(
        Method.SNIP,
        "snip: `|W| ⊙ Σ_s |∇_W L_s|` (per-sample gradients, one batched pass); wanda: `|W| · ‖x‖` (forward only)",
        check_enum(Method),
        metavar="snip|wanda",
        cli=str,
    )
    nsamples: int = option(
        128, "rows drawn from DATA: `default_rng(seed).permutation(rows)[:N]`", check_integer(1), metavar="N"
    )
    seed: int = option(0, "seed of that permutation", check_integer(0), metavar="N")
    keep: float = option(
        1e-4,
        "fraction of each tensor's top scores stored (`K = ceil(F·n)`); `--p`/`--q` may not exceed it later",
        check_number(0, 1, low_open=True),
        metavar="F",
    )
    targets: str = option(
        "mlp", "which Linear weights of the decoder layers are scored", check_targets, metavar="mlp|attn|all|re:REGEX"
    )
    max_length: int = option(
        2048,
        "tokens per sample; longer samples lose their end; samples left with no response token are skipped and counted",
        check_integer(2),
        metavar="N",
    )
    batch_size: int | None = option(
        None,
        "samples per batch; auto: planned under --max-memory (at most 512 padded tokens on cpu, 4096 on cuda), halved on GPU out-of-memory",
        check_batch,
        metavar="N|auto",
        cli=str,
        readme_default="auto",
    )
    max_memory: int | None = option(
        None,
        "peak memory the auto batch plan aims under (host RSS on cpu, allocated memory on cuda); "
        "default half of this machine's memory on cpu, 85% of the free memory on cuda",
        check_size,
        metavar="SIZE",
        cli=str,
        readme_default="auto",
    )
    device: str = option("auto", "cuda when present", check_device, metavar="auto|cpu|cuda[:i]")
    dtype: str = option(
        "auto",
        "bf16 on cuda (fp16 on a GPU without native bf16), f32 on cpu; accumulation is always fp32 (float16 snip scales "
        "the loss by 2^12 so per-sample gradients do not underflow)",
        check_choice(*DTYPES),
        metavar="auto|float32|bfloat16|float16",
    )
    chat_template: bool = option(False, "format prompts with the tokenizer's chat template", check_flag)
    prompt_column: str = option("prompt", "name of the prompt column in DATA", check_text, metavar="NAME")
    response_column: str = option("response", "name of the response column in DATA", check_text, metavar="NAME")
    trust_remote_code: bool = option(False, "run the model's own Python code", check_flag)
    stream: bool = option(
        False,
        "one decoder layer in memory at a time, read from the shards (Llama, Qwen2, Mistral); same scores",
        check_flag,
    )
    spill_dir: Path | None = option(
        None,
        "with stream: keep the layer activations in files under DIR (removed afterwards) instead of host memory",
        check_path,
        metavar="DIR",
        cli=Path,
        relative=True,
    )

    def __post_init__(self):
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "output", Path(self.output))
        object.__setattr__(self, "data", str(self.data))
        validate(self)
        from spinctl.scoring import distributed

        ranks = distributed.context().world_size
        if ranks > 1 and re.fullmatch(r"cuda:\d+", self.device):
            # Each rank takes cuda:LOCAL_RANK (runtime.resolve_device); a fixed cuda:N would put
            # every rank of the job on that one GPU, contending for its memory.
            raise OptionError(
                "device",
                self.device,
                f"under torchrun ({ranks} ranks) every rank would use that one GPU; use {{device}} cuda or auto "
                f"(each rank takes cuda:LOCAL_RANK), or limit GPUs with CUDA_VISIBLE_DEVICES",
            )
        if self.spill_dir is not None:
            if not self.stream:
                raise OptionError("spill_dir", self.spill_dir, "applies to {stream} only; add {stream}")
            from spinctl.scoring.layerwise_store import check_spill_dir

            check_spill_dir(self.spill_dir)


@dataclass(frozen=True)
class SelectConfig:
    """One selection: the retain score file, the coupled ones, p, q and the mode."""

    retain: Path
    couple: tuple[Path, ...]
    p: float = option(
        5e-7,
        "fraction of each tensor in the retain top set (`k = floor(f·n)`, ties to the "
        "smaller index, zero scores never selected)",
        check_number(0, 1),
        metavar="P",
    )
    q: float = option(5e-7, "fraction of each tensor in each coupled top set", check_number(0, 1), metavar="Q")
    mode: Mode = option(
        Mode.paper,
        "paper: `(top_q(C1) ∩ … ∩ top_q(Cm)) \\ top_p(R)`; reference: the official "
        "code's positional AND, exactly two coupled sets (privacy, then fairness)",
        check_enum(Mode),
        metavar="paper|reference",
        cli=str,
    )

    def __post_init__(self):
        validate(self)
        if not self.couple:
            raise UsageError("give at least one --couple score file")
        if self.mode is Mode.reference and len(self.couple) != 2:
            raise OptionError(
                "mode",
                self.mode,
                f"takes exactly two coupled score files (privacy, then fairness), got {len(self.couple)}",
            )


@dataclass(frozen=True)
class PatchConfig:
    """Where and how to zero: a new directory, or the model itself (undo log first)."""

    model: Path
    output: Path | None = None  # None with in_place
    in_place: bool = option(False, "write zeros into the model itself, undo log first", check_flag)
    dry_run: bool = option(False, "report what would be zeroed; write nothing", check_flag, yaml=False)
    link: bool = option(False, "hard-link shards with nothing to zero instead of copying them", check_flag)
    no_hash: bool = option(
        False, "no sha256 (kernel-side copy out of place); verify then checks the zeros only", check_flag
    )
    force: bool = option(
        False,
        "allow writing in place through symlinks (Hugging Face cache snapshots point into shared blobs)",
        check_flag,
    )
    wait: bool = option(False, "if another spinctl holds the model, wait for it instead of failing", check_flag)

    def __post_init__(self):
        validate(self)
        if self.in_place == (self.output is not None):
            raise UsageError("give either an output directory or --in-place, not both or neither")
        if self.in_place and self.link:
            raise OptionError("link", None, "only applies to out-of-place patching")


@dataclass(frozen=True)
class EvalConfig:
    """Awareness of one model on one question file: greedy answers, judged."""

    model: Path
    prompts: Path
    column: str = option("questions", "column holding the questions", check_text, metavar="NAME")
    limit: int | None = option(
        None, "only the first N questions", check_integer(1, none_ok=True), metavar="N", readme_default="all"
    )
    max_new_tokens: int = option(64, "greedy tokens per answer", check_integer(1), metavar="N")
    batch_size: int = option(8, "questions (or `--pairs` responses) per batch", check_integer(1), metavar="N")
    judge: str = option(
        "keyword",
        "keyword: refusal, caution and compliance rules on the answer; "
        "model: a local causal LM reading `--judge-template`",
        check_choice(*(j.value for j in JudgeName)),
        metavar="keyword|model",
        cli=str,
    )
    judge_model: Path | None = option(
        None,
        "local causal LM whose first line of answer is read as safe/unsafe",
        check_path,
        metavar="DIR",
        cli=Path,
        relative=True,
    )
    judge_template: Path | None = option(
        None, "template with `{question}` and `{answer}`", check_path, metavar="FILE", cli=Path, relative=True
    )
    save: Path | None = option(
        None, "write question, answer, verdict per line (JSONL)", check_path, metavar="FILE", cli=Path, relative=True
    )
    device: str = option("auto", "as for score", check_device, metavar="auto|cpu|cuda[:i]")
    dtype: str = option("auto", "as for score", check_choice(*DTYPES), metavar="auto|float32|bfloat16|float16")

    def __post_init__(self):
        if self.judge_model is not None and self.judge == "keyword":
            object.__setattr__(self, "judge", "model")  # a judge model on its own means the model judge
        validate(self)
        if self.judge == "model" and (self.judge_model is None or self.judge_template is None):
            raise OptionError("judge", "model", "needs both {judge_model} DIR and {judge_template} FILE")


MAX_BINS = 10_000


def check_bins(v):
    """Histogram bins: at least 2; at most MAX_BINS, since the plot is about 1000 pixels wide (more bins cannot
    be told apart) and numpy allocates the bin edges up front (--bins 10**13 asked it for 73 TiB)."""
    if isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= MAX_BINS:
        return v
    raise ValueError(f"must be an integer in [2, {MAX_BINS}]")


@dataclass(frozen=True)
class ReportConfig:
    """A report of one patch: its selection, the score files it came from, eval results, and where to write it."""

    output: Path  # the report directory
    patched: Path  # the patched model (its manifest; its README.md with card)
    selection: Path
    retain: Path
    couple: tuple[Path, ...]
    evals: tuple[Path, ...] = ()  # JSON of `spinctl eval`/`ppl`/`run --json`
    config: Path | None = None  # spin.yaml to quote; else the equivalent commands
    card: bool = option(
        False,
        "also write the summary as a section of the patched model's README.md, between markers "
        "(rerunning replaces it), recorded in its manifest so verify and revert cover it",
        check_flag,
    )
    bins: int = option(40, "histogram bins of the score-distribution plot", check_bins, metavar="N")

    def __post_init__(self):
        validate(self)
