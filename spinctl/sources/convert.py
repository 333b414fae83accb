"""GGUF file -> Hugging Face safetensors directory (config, tokenizer, chat template, generation config, weights)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from spinctl.errors import InputError, OutputError, UnsupportedError, one_line
from spinctl.io.files import staged_dir

DTYPES = ("float32", "bfloat16", "float16")
# Decoder-only architectures whose GGUF tensors transformers maps back to its own names and
# that spinctl scores (their decoder Linear layers are the scoring targets, docs/design.md §2). Others are refused up front.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "stablelm", "starcoder2")
GGUF_MAGIC = b"GGUF"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UnsupportedError("reading GGUF files needs the gguf package: pip install 'spinctl[gguf]'") from None
    return gguf


def check_gguf(path: Path):
    """Open `path` as GGUF; return (reader, architecture). Refuses what cannot be converted, before any work."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{path}: not a GGUF file (no GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
        arch = str(reader.fields["general.architecture"].contents())
    except KeyError:
        raise InputError(f"{path}: GGUF metadata has no general.architecture") from None
    except (ValueError, IndexError, OSError, RecursionError) as e:  # truncated or corrupt header/tensor table
        raise InputError(f"{path}: cannot read the GGUF file ({one_line(e)})") from None
    if arch not in ARCHITECTURES:
        raise UnsupportedError(
            f"{path}: architecture {arch!r} cannot be converted; supported: {', '.join(ARCHITECTURES)}"
        )
    _check_head_count(path, reader, arch)
    # gguf keeps its dequantizers in a private table; without it, conversion itself reports the type.
    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is not None:
        plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
        for t in reader.tensors:
            if t.tensor_type not in traits and t.tensor_type not in plain:
                raise UnsupportedError(
                    f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, "
                    "which the gguf package cannot dequantize"
                )
    return reader, arch


def _check_head_count(path: Path, reader, arch: str) -> None:
    """transformers divides by the head count building the config: 0 would end in a ZeroDivisionError."""
    key = f"{arch}.attention.head_count"
    field = reader.fields.get(key)
    if field is None:
        return  # transformers reports what it lacks
    try:
        value = field.contents()
    except (ValueError, IndexError, TypeError) as e:
        raise InputError(f"{path}: cannot read GGUF key {key} ({one_line(e)})") from None
    counts = value if isinstance(value, list) else [value]
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
        raise InputError(f"{path}: GGUF key {key} is {value!r}; a model needs at least one attention head")


def convert_gguf(gguf_file: Path, output: Path, dtype: str = "float32", max_shard_size: str = "5GB") -> dict:
    """Dequantize `gguf_file` into a new directory `output`, written under a temporary name and renamed.

    Returns a summary: architecture, tensor count, parameters, dtype, seconds.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    from spinctl.load_errors import quiet_transformers

    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    gguf_file, output = Path(gguf_file), Path(output)
    _, arch = check_gguf(gguf_file)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise OutputError(f"{output}: already exists; give a new directory")
    hf_logging.disable_progress_bar()  # its tqdm bars would interleave with ours on stderr
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        # Quiet: transformers warns of what the file lacks, then fails or converts; the outcome is our one line.
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            # Meta device: no random init of weights about to be replaced (a 7B init costs minutes).
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
            # transformers undoes llama.cpp's Q/K row permutation and renames blk.N.* to HF names here.
            with _no_tqdm():
                tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    except (ValueError, KeyError, NotImplementedError, OSError, TypeError, ArithmeticError, *_strict_errors()) as e:
        raise UnsupportedError(f"{gguf_file}: cannot convert ({_reason(e)})") from None
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # tied: stored once, as the embedding
    missing = sorted(expected - set(tensors))
    if missing:
        raise UnsupportedError(
            f"{gguf_file}: no GGUF tensor for {missing[0]} ({len(missing)} missing); "
            "the file's tensor names do not map to this architecture"
        )
    state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in tensors.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.dtype = dtype
    generation = GenerationConfig.from_model_config(config)
    with staged_dir(output) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        generation.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {
        "gguf": str(gguf_file),
        "output": str(output),
        "architecture": arch,
        "model_type": config.model_type,
        "tensors": len(state),
        "parameters": int(sum(v.numel() for v in state.values())),
        "dtype": dtype,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _strict_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's config validation errors (hidden_size not an int, heads not dividing it)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return ()
    return (StrictDataclassError,)


def _reason(e: BaseException) -> str:
    if isinstance(e, _strict_errors()) and e.__cause__ is not None:
        return one_line(e.__cause__)  # its own first line only names the field
    if isinstance(e, KeyError):
        return f"KeyError: {one_line(e)}"
    return one_line(e)


@contextlib.contextmanager
def _no_tqdm():
    """transformers' GGUF loader draws a tqdm bar of its own, which no logging switch turns off."""
    from transformers import modeling_gguf_pytorch_utils as loader

    original = loader.tqdm
    loader.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        loader.tqdm = original
