"""Calibration data (docs/design.md §2): read CSV/JSONL prompt/response rows, pick the seeded rows, tokenize."""

from __future__ import annotations

import csv
import hashlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinctl.errors import InputError, SpinctlError, one_line
from spinctl.io import untrusted

BUILTIN_PREFIX = "builtin:"
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}


@dataclass(frozen=True)
class Rows:
    """All rows of a calibration file, as read; `sha256` is of the file's bytes."""

    path: Path
    sha256: str
    prompts: list[str]
    responses: list[str]

    @property
    def count(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Sample:
    """One tokenized row: prompt tokens first, then response tokens (labels on those only)."""

    row: int
    ids: tuple[int, ...]
    n_prompt: int  # positions [0, n_prompt) are prompt (label -100)


@dataclass(frozen=True)
class Calibration:
    """The samples that get scored, in row-selection order, and how many were skipped."""

    rows: Rows
    samples: list[Sample]
    skipped: int  # selected rows left without a response token after truncation

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)


def builtin_names() -> list[str]:
    from importlib.resources import files

    return sorted(p.name[: -len(".jsonl")] for p in files("spinctl.builtin").iterdir() if p.name.endswith(".jsonl"))


def resolve(data: str | Path) -> Path:
    """`builtin:NAME` -> the packaged spinctl/builtin/NAME.jsonl; anything else is a path."""
    text = str(data)
    if text.startswith(BUILTIN_PREFIX):
        from importlib.resources import as_file, files

        name = text[len(BUILTIN_PREFIX) :]
        res = files("spinctl.builtin") / f"{name}.jsonl"
        if "/" in name or "\\" in name or not name or not res.is_file():
            raise InputError(
                f"{text}: no such built-in dataset; available: {', '.join(BUILTIN_PREFIX + n for n in builtin_names())}"
            )
        with as_file(res) as p:  # a real path for wheels and source trees alike
            return Path(p)
    path = Path(text)
    if not path.exists():
        raise InputError(
            f"{path}: no such data file; pass a CSV or JSONL file with prompt and response columns, or builtin:NAME"
        )
    if not path.is_file():
        raise InputError(f"{path}: is not a file; pass a CSV or JSONL file")
    return path


def label(data: str | Path) -> str:
    """A short name for a data file in tables: `builtin:NAME` for a packaged set (given by that
    name or by the path `resolve` made of it), else the file's name."""
    text = str(data)
    if text.startswith(BUILTIN_PREFIX):
        return text
    path = Path(text)
    from importlib.resources import files

    builtin = Path(str(files("spinctl.builtin")))
    if path.suffix == ".jsonl" and path.parent.resolve() == builtin.resolve():
        return BUILTIN_PREFIX + path.stem
    return path.name


def _parse_json(path: Path, text: str) -> tuple[list[dict], list[str]]:
    stripped = text.lstrip()
    try:
        if path.suffix == ".json" and stripped.startswith("["):
            records = untrusted.loads(text)
        else:
            records = [untrusted.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON Lines ({e}); one JSON object per line is expected") from None
    columns: dict[str, None] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{path}: record {i + 1} is not a JSON object")
        columns.update(dict.fromkeys(rec))
    return records, list(columns)


def _parse_csv(path: Path, text: str) -> tuple[list[dict], list[str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long responses exceed the 128 KiB default
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = list(reader.fieldnames or [])
        records = list(reader)
    except csv.Error as e:
        raise InputError(f"{path}: not valid CSV ({e})") from None
    return records, columns


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON can spell one, "\\ud800"): no UTF-8 form,
    and tokenizers refuse it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_rows(data: str | Path, prompt_column: str = "prompt", response_column: str = "response") -> Rows:
    """Read every row of a CSV (header line) or JSONL file; check the two columns exist."""
    path = resolve(data)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save the data file as UTF-8") from None
    parse = _parse_json if path.suffix.lower() in JSON_SUFFIXES else _parse_csv
    records, columns = parse(path, text)
    if not records:
        raise InputError(f"{path}: has no data rows")
    missing = [c for c in (prompt_column, response_column) if c not in columns]
    if missing:
        raise InputError(
            f"{path}: no column {missing[0]!r}; available columns: {', '.join(map(repr, columns))} "
            f"(choose with --prompt-column / --response-column)"
        )
    out: dict[str, list[str]] = {prompt_column: [], response_column: []}
    for i, rec in enumerate(records):
        for col in (prompt_column, response_column):
            value = rec.get(col)
            if value is None and not (parse is _parse_json and col in rec):
                value = ""  # a short CSV row, or a JSON record without the key: empty text
            if not isinstance(value, str):
                raise InputError(f"{path}: row {i + 1}: column {col!r} is not a string")
            if not is_unicode(value):
                raise InputError(f"{path}: row {i + 1}: column {col!r} is not valid Unicode text (lone surrogate)")
            out[col].append(value)
    return Rows(path, hashlib.sha256(raw).hexdigest(), out[prompt_column], out[response_column])


def select_rows(n_rows: int, nsamples: int, seed: int, path: Path | str = "data") -> np.ndarray:
    """docs/design.md §2: `default_rng(seed).permutation(n_rows)[:nsamples]` (what `datasets` shuffle+select picks)."""
    if nsamples > n_rows:
        raise InputError(
            f"{path}: has {n_rows} rows, fewer than --nsamples {nsamples}; lower --nsamples to at most {n_rows}"
        )
    return np.random.default_rng(seed).permutation(n_rows)[:nsamples].astype(np.int64)


def tokenize(
    tokenizer, prompts: list[str], responses: list[str], max_length: int, chat_template: bool = False
) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per pair: tokenizer(prompt) with special tokens + tokenizer(response) without.

    With `chat_template` the prompt is the user turn of the tokenizer's chat template (with
    the generation prompt); the template carries its own special tokens. Truncation to
    `max_length` cuts the end.
    """
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: tokenizer has no chat template; drop --chat-template"
            )
        texts = [render_chat(tokenizer, p) for p in prompts]
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompt_ids, response_ids):
        ids = (list(p) + list(r))[:max_length]
        out.append((ids, min(len(p), len(ids))))
    return out


def render_chat(tokenizer, prompt: str) -> str:
    """`prompt` as the user turn of the tokenizer's chat template, with the generation prompt.

    The template is the model's own Jinja code: a syntax error, a `raise_exception` call or any
    other failure inside it is the model's fault, reported as one line naming the model."""
    where = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    except SpinctlError:
        raise
    except Exception as e:  # jinja2.TemplateError, or whatever the template's code raises
        # one_line words a RecursionError as a JSON file's nesting: here it is the template's own recursion
        reason = "it recurses too deeply" if isinstance(e, RecursionError) else one_line(e)
        raise InputError(f"{where}: chat template cannot be applied ({type(e).__name__}: {reason})") from None
    if not isinstance(text, str) or not is_unicode(text):
        raise InputError(f"{where}: chat template cannot be applied (it renders to no valid Unicode text)")
    return text


def pad_id(tokenizer, vocab_size: int) -> int:
    """The id to pad batches with: the tokenizer's pad, else eos, bos, unk, else 0, the first inside
    the model's embedding. Pads are never attended, so any real id pads the same; the tokenizer's own
    can lie past the embedding (fine-tunes that add `<pad>` without resizing it) and index out of range."""
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id):
        if isinstance(i, int) and 0 <= i < vocab_size:
            return i
    return 0


def has_response(ids: list[int] | tuple[int, ...], n_prompt: int) -> bool:
    """A sample counts if at least one response token is predicted (the shifted loss needs t >= 1)."""
    return len(ids) > max(n_prompt, 1)


def encode(rows: Rows, picked: np.ndarray, tokenizer, max_length: int, chat_template: bool = False) -> Calibration:
    """Tokenize the picked rows; samples without a response token are skipped and counted."""
    encoded = tokenize(
        tokenizer, [rows.prompts[i] for i in picked], [rows.responses[i] for i in picked], max_length, chat_template
    )
    samples = [Sample(int(row), tuple(ids), n) for row, (ids, n) in zip(picked, encoded) if has_response(ids, n)]
    if not samples:
        raise InputError(
            f"{rows.path}: all {len(picked)} selected samples have no response tokens within "
            f"--max-length {max_length}; raise --max-length or check the response column"
        )
    return Calibration(rows, samples, len(picked) - len(samples))


def load_calibration(
    data: str | Path,
    tokenizer,
    nsamples: int,
    seed: int,
    max_length: int,
    chat_template: bool = False,
    prompt_column: str = "prompt",
    response_column: str = "response",
) -> Calibration:
    """Read, select and tokenize in one call."""
    rows = read_rows(data, prompt_column, response_column)
    return encode(rows, select_rows(rows.count, nsamples, seed, rows.path), tokenizer, max_length, chat_template)
