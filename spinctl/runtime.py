"""Where a model runs and how it is loaded: --device and --dtype, the tokenizer, the causal LM.

One loader for scoring, evaluation, perplexity and the sweep. torch and transformers are
imported inside the functions: checking a --device string must not load them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinctl.errors import InputError, SpinctlError, UnsupportedError, UsageError, one_line
from spinctl.io.checkpoint import open_checkpoint
from spinctl.load_errors import check_generation_config, load_error_types, load_reason, quiet_transformers
from spinctl.scoring import distributed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_device(device: object) -> str:
    """The value itself when it is auto, cpu, cuda or cuda:N (the check of config.py), else a usage error."""
    from spinctl.config import DEVICES
    from spinctl.config import check_device as valid

    try:
        return valid(device)
    except ValueError:
        raise UsageError(f"--device {device!r}: expected {DEVICES}") from None


@dataclass
class LoadedModel:
    """A model and tokenizer on their device: load once, score several datasets."""

    path: Path
    model: Any
    tokenizer: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype


def resolve_device(device: str):
    """--device as a torch.device; under torchrun, auto (on a GPU machine) and cuda mean cuda:LOCAL_RANK."""
    import torch

    ctx = distributed.context()
    if device == "auto":
        if not (ctx.enabled and torch.cuda.is_available()):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = "cuda"
    if device == "cuda" and ctx.enabled:
        device = f"cuda:{ctx.local_rank}"  # one GPU per rank: ranks sharing a GPU would contend for it
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError(f"--device {device}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            per_node = "; start at most one rank per GPU (torchrun --nproc-per-node)" if ctx.enabled else ""
            raise UnsupportedError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present{per_node}"
            )
    return dev


def resolve_dtype(dtype: str, device):
    """auto: bf16 on a CUDA device that supports it (compute capability 8.0+), else fp16 there
    (with snip's loss scale), fp32 on CPU. An explicit bfloat16 on a GPU without it is an error."""
    import torch

    if device.type != "cuda":
        return torch.float32 if dtype == "auto" else getattr(torch, dtype)
    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 is slow
    except TypeError:  # torch before 2.4 has no such flag
        bf16 = torch.cuda.is_bf16_supported()
    if dtype == "bfloat16" and not bf16:
        raise UnsupportedError(f"{device}: this GPU has no native bfloat16; use --dtype float16 or float32")
    return getattr(torch, dtype) if dtype != "auto" else torch.bfloat16 if bf16 else torch.float16


def check_model_dir(path: Path) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (config.json, tokenizer files, safetensors weights)")


def load_config(path: Path, trust_remote_code: bool = False):
    """config.json parsed (and validated) by transformers, quietly; a config transformers refuses
    is refused here in one line naming the reason."""
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except load_error_types() as e:
        raise UnsupportedError(f"{path}: cannot load as a causal language model ({load_reason(path, e)})") from None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if (Path(path) / "config.json").is_file():
        load_config(path, trust_remote_code)  # AutoTokenizer reads it first, and would fail in a traceback
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RecursionError) as e:
        # Without its files transformers tries converters and names what they lack (protobuf, tiktoken)
        found = any((Path(path) / f).is_file() for f in TOKENIZER_FILES)
        detail = one_line(e) if found else f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) found"
        raise InputError(f"{path}: cannot load the tokenizer ({detail})") from None


def load_model(path: Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> LoadedModel:
    """Offline load of a causal LM and its tokenizer onto `device`; remote code only when allowed.

    Refuses a checkpoint that lacks weights the architecture needs (transformers would
    initialise them at random) and one that does not fit the device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    check_model_dir(path)
    open_checkpoint(path)  # validates the safetensors headers before transformers reads them
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    opts = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    tokenizer = load_tokenizer(path, trust_remote_code)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the caller draws its own progress on stderr
    try:
        # Loaded on the host, then moved: transformers needs `accelerate`, not a dependency of
        # spinctl, for any device_map. --stream reads one layer at a time instead.
        # ignore_mismatched_sizes: a weight whose shape config.json contradicts comes back in
        # `info` with both shapes (refused below), not as an error pointing at a logged table.
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True, **opts
            )
    except load_error_types() as e:
        raise UnsupportedError(f"{path}: cannot load as a causal language model ({load_reason(path, e)})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    # Sets in transformers: sorted, so the weight named is the same on every run
    mismatched = sorted(info.get("mismatched_keys", ()), key=lambda k: str(k[0] if isinstance(k, tuple) else k))
    if mismatched:
        first = mismatched[0]
        if isinstance(first, tuple) and len(first) == 3:
            name, ckpt_shape, model_shape = first
            raise UnsupportedError(
                f"{path}: weight {name} is {list(ckpt_shape)} in the checkpoint but config.json makes it "
                f"{list(model_shape)} ({len(mismatched)} weight(s) differ); does config.json belong to these weights?"
            )
    lacking = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (*info.get("missing_keys", ()), *mismatched))
    if lacking:  # transformers would score randomly initialised weights in their place
        raise UnsupportedError(
            f"{path}: the checkpoint lacks {len(lacking)} weight(s) the model needs "
            f"(e.g. {lacking[0]}); is it complete and of this architecture?"
        )
    model.requires_grad_(False)  # no weight gradients: only the per-sample ones the hooks form
    model.eval()
    try:
        model.to(device)
    except torch.cuda.OutOfMemoryError:
        raise SpinctlError(
            f"{path}: the model does not fit in the memory of {device}; score it with --stream"
        ) from None
    return LoadedModel(path, model, tokenizer, device, torch_dtype)


def load_causal_lm(model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) ready for batched generation and scoring of texts: left padding and a
    pad token inside the embedding. Never remote code, never the network."""
    from spinctl.scoring.data import pad_id

    loaded = load_model(Path(model_dir), device, dtype)
    check_generation_config(loaded.path, loaded.model)
    tok = loaded.tokenizer
    tok.padding_side = "left"  # every prompt then ends at the last column, where generation continues
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if tok.pad_token_id is None or not 0 <= tok.pad_token_id < vocab:
        # Pad ids are masked out, so any real token will do (eos first); one past the
        # embedding (an added `<pad>`) would index out of range in every batch.
        tok.pad_token = tok.convert_ids_to_tokens(pad_id(tok, vocab))
    return loaded.model, tok
