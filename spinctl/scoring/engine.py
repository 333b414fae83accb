"""`spinctl score`: one batched pass over the calibration samples, top-K per weight, a score file."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spinctl.scoring import data as data_mod
from spinctl.scoring import distributed
from spinctl.io.checkpoint import open_checkpoint
from spinctl.runtime import check_device, check_rank_device
from spinctl.errors import InputError, OutputError, SpinctlError, UnsupportedError, UsageError
from spinctl.io.formats import keep_count, score_meta, write_scores
from spinctl.scoring.methods import METHODS, Method, response_loss
from spinctl.scoring.targets import check_spec, decoder_layers, select_targets

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_BATCH = 8  # samples per batch on CPU: past this, bigger batches buy no speed
CUDA_TOKENS = 4096  # padded tokens per batch on CUDA: saturates an H200, keeps 7B under 64 GiB
CUDA_MAX_BATCH = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
Progress = Callable[[int, int], None]  # progress(advance_samples, total); advance < 0 rewinds after an OOM retry
# fp16 has 5 exponent bits: a per-sample gradient of a mean token loss (at the logits about
# 1 / (response tokens · vocab)) falls below its smallest subnormal, 6e-8, and becomes zero.
# snip's backward runs on the loss times 2^k; the fp32 accumulators are divided by 2^k after
# (exact). An overflow (inf or NaN in the accumulators) reruns the pass at 2^(k-4), down to 2^0.
# bf16 and fp32 have fp32's exponent range: no scale.
LOSS_SCALE_LOG2 = {"float16": 12}
LOSS_SCALE_STEP = 4


def loss_scale_log2(dtype) -> int:
    """The first loss scale (log2) for a model dtype (torch.dtype)."""
    return LOSS_SCALE_LOG2.get(str(dtype).removeprefix("torch."), 0)


@dataclass(frozen=True)
class ScoreConfig:
    """Options of one scoring run (docs/design.md §2), validated once here."""

    model: Path
    data: str  # a CSV/JSONL path or builtin:NAME
    output: Path
    method: Method = Method.SNIP
    nsamples: int = 128
    seed: int = 0
    keep: float = 1e-4
    targets: str = "mlp"
    max_length: int = 2048
    batch_size: int | None = None  # None: auto
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    chat_template: bool = False
    prompt_column: str = "prompt"
    response_column: str = "response"
    trust_remote_code: bool = False
    stream: bool = False  # one decoder layer on the device at a time (stream_score.py)
    spill_dir: Path | None = None  # with stream: layer inputs in files here instead of host memory

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise once)
        set_("model", Path(self.model))
        set_("output", Path(self.output))
        set_("data", str(self.data))
        try:
            set_("method", Method(self.method))
        except ValueError:
            raise UsageError(f"--method {self.method!r}: expected one of {', '.join(m.value for m in Method)}") from None
        if not (isinstance(self.keep, (int, float)) and 0 < self.keep <= 1):
            raise UsageError(f"--keep {self.keep}: must be in (0, 1]")
        for name, low in (("nsamples", 1), ("seed", 0), ("max_length", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be an integer >= {low}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise UsageError(f"--batch-size {self.batch_size}: must be an integer >= 1 (or auto)")
        check_device(self.device)
        check_rank_device(self.device, distributed.context().world_size)
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        check_spec(self.targets)
        if not isinstance(self.stream, bool):
            raise UsageError(f"--stream {self.stream!r}: must be true or false")
        if self.spill_dir is not None:
            from spinctl.scoring.layerwise_store import check_spill_dir

            set_("spill_dir", Path(self.spill_dir))
            if not self.stream:
                raise UsageError(f"--spill-dir {self.spill_dir}: applies to --stream only; add --stream")
            check_spill_dir(self.spill_dir)


@dataclass
class LoadedModel:
    """A model and tokenizer on their device: load once, score several datasets."""

    path: Path
    model: Any
    tokenizer: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype


def _one_line(e: BaseException) -> str:
    if isinstance(e, RecursionError):  # json inside transformers, on a config or tokenizer file nested `[` x 100000
        return "a JSON file of the model is nested too deeply"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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
            raise UnsupportedError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present{per_node}")
    return dev


def resolve_dtype(dtype: str, device):
    import torch

    return getattr(torch, dtype) if dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32


def check_model_dir(path: Path) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(f"{path}: not a model directory (config.json, tokenizer files, safetensors weights)")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RecursionError) as e:
        # Without its files transformers tries converters and names what they lack (protobuf, tiktoken)
        found = any((Path(path) / f).is_file() for f in TOKENIZER_FILES)
        detail = _one_line(e) if found else f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) found"
        raise InputError(f"{path}: cannot load the tokenizer ({detail})") from None


def load_model(cfg: ScoreConfig) -> LoadedModel:
    """Offline load of the model and tokenizer; remote code only when the config allows it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = cfg.model
    check_model_dir(path)
    open_checkpoint(path)  # validates the safetensors headers before transformers reads them
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    opts = {"local_files_only": True, "trust_remote_code": cfg.trust_remote_code}
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the caller draws its own progress on stderr
    try:
        # Loaded on the host, then moved: transformers needs `accelerate`, not a dependency of
        # spinctl, for any device_map. --stream reads one layer at a time instead.
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **opts)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:
        raise UnsupportedError(f"{path}: cannot load as a causal language model ({_one_line(e)})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    lacking = [str(k[0] if isinstance(k, tuple) else k) for k in (*info.get("missing_keys", ()), *info.get("mismatched_keys", ()))]
    if lacking:  # transformers would score randomly initialised weights in their place
        raise UnsupportedError(f"{path}: the checkpoint lacks {len(lacking)} weight(s) the model needs "
                               f"(e.g. {lacking[0]}); is it complete and of this architecture?")
    model.requires_grad_(False)  # no weight gradients: only the per-sample ones the hooks form
    model.eval()
    try:
        model.to(device)
    except torch.cuda.OutOfMemoryError:
        raise SpinctlError(f"{path}: the model does not fit in the memory of {device}; score it with --stream") from None
    return LoadedModel(path, model, tokenizer, device, dtype)


def make_batches(samples: list, batch_size: int, token_budget: int | None = None) -> list[list]:
    """Length-sorted batches (longest first, ties in selection order): little padding, and the
    first batch is the largest, so an out-of-memory shows up before any work is lost."""
    batches: list[list] = []
    for s in sorted(samples, key=lambda s: -len(s.ids)):
        cur = batches[-1] if batches else None
        if cur is None or len(cur) == batch_size or (token_budget and (len(cur) + 1) * len(cur[0].ids) > token_budget):
            batches.append([s])
        else:
            cur.append(s)
    return batches


def collate(batch: list, pad_id: int, device):
    """ids [B, T] right-padded, labels [B, T] (-100 off the response), positions [B, T] bool."""
    import torch

    T = len(batch[0].ids)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    for b, s in enumerate(batch):
        row = torch.tensor(s.ids, dtype=torch.long)
        ids[b, : len(row)] = row
        labels[b, s.n_prompt : len(row)] = row[s.n_prompt :]
    return ids.to(device), labels.to(device), (labels != -100).to(device)


def _grad_from_here(module, args, kwargs):
    """Forward pre-hook on the lowest scored layer: its input becomes the leaf gradients flow to."""
    if args:
        return (args[0].detach().requires_grad_(),) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}


def run_pass(model, acc, batches: list[list], pad_id: int, device, first_layer, progress: Progress | None = None,
             loss_scale: float = 1.0) -> None:
    """Feed every batch through the model with `acc` hooked in (snip: forward + backward).

    No attention mask: with right padding and causal attention no real position sees a
    pad, pad logits carry no loss, so pad gradients are exactly zero; the kernels stay
    the unmasked (flash) ones.
    """
    import torch

    total = sum(len(b) for b in batches)
    hook = first_layer.register_forward_pre_hook(_grad_from_here, with_kwargs=True) if acc.needs_grad else None
    try:
        with acc:
            for batch in batches:
                ids, labels, positions = collate(batch, pad_id, device)
                acc.begin_batch(len(batch), positions)
                if acc.needs_grad:
                    logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
                    (response_loss(logits, labels) * loss_scale).backward()  # fp32 loss: the scale is exact
                    del logits
                else:
                    with torch.no_grad():
                        model.base_model(input_ids=ids, use_cache=False)  # lm_head unused: stop before it
                if progress:
                    progress(len(batch), total)
    finally:
        if hook is not None:
            hook.remove()


def topk_ranked(flat, k: int):
    """The top set (docs/design.md §3) on the device: k largest positive scores, ties to the smaller index,
    in rank order (score desc, index asc). torch.topk orders ties arbitrarily, so it only
    supplies the k-th value; the set is rebuilt from it. flat: fp32 [n]."""
    import numpy as np
    import torch

    k = min(k, flat.numel())
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    thr = torch.topk(flat, k, sorted=False).values.min()
    if thr > 0:
        above = torch.nonzero(flat > thr).squeeze(1)  # ascending, fewer than k
        ties = torch.nonzero(flat == thr).squeeze(1)[: k - above.numel()]  # the smallest indices
        idx = torch.sort(torch.cat([above, ties])).values
    else:  # fewer than k positive scores: all of them; zeros never enter
        idx = torch.nonzero(flat > 0).squeeze(1)
    sc = flat[idx]
    order = torch.sort(sc, descending=True, stable=True).indices  # stable: ties keep index order
    return idx[order].cpu().numpy(), sc[order].cpu().numpy()


def _plan(cfg: ScoreConfig, loaded: LoadedModel, targets, samples) -> tuple[int, int | None]:
    """(samples per batch, padded-token budget per batch or None)."""
    import torch

    if cfg.batch_size is not None:
        return cfg.batch_size, None
    if loaded.device.type != "cuda":
        return CPU_BATCH, None
    # Largest batch that fits, capped where throughput stops growing. Estimated bytes per token:
    # saved activations per layer (2 norms + attention ≈ 9·D, MLP ≈ 4·I) + fp32 logits and grads.
    c = loaded.model.config
    D = getattr(c, "hidden_size", 4096)
    inter = getattr(c, "intermediate_size", None) or 4 * D
    per_token = getattr(c, "num_hidden_layers", 32) * (9 * D + 4 * inter) * loaded.dtype.itemsize + 12 * getattr(c, "vocab_size", 32000)
    per_sample = max(t.module.weight.numel() for t in targets) * loaded.dtype.itemsize  # one [out, in] gradient
    cached = torch.cuda.memory_reserved(loaded.device) - torch.cuda.memory_allocated(loaded.device)  # reusable too
    free = (torch.cuda.mem_get_info(loaded.device)[0] + cached) * 0.85
    longest = max(len(s.ids) for s in samples)
    batch = max(1, min(CUDA_MAX_BATCH, int(free // (longest * per_token + per_sample))))
    return batch, max(longest, min(CUDA_TOKENS, int(free // per_token)))


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_checkpoint(model_path: Path, ckpt, targets) -> None:
    """Scores are keyed by checkpoint tensor names: each scored weight must be stored as used."""
    for t in targets:
        entry = ckpt.tensors.get(t.name)
        if entry is None or list(entry.shape) != list(t.module.weight.shape):
            found = "missing" if entry is None else f"stored as {list(entry.shape)}"
            raise UnsupportedError(f"{model_path}: scored weight {t.name} {list(t.module.weight.shape)} is {found} in the "
                                   f"checkpoint; spinctl needs weights stored as the model uses them")


def _accumulate(cfg: ScoreConfig, loaded: LoadedModel, acc, targets, samples, progress: Progress | None,
                loss_scale: float = 1.0) -> int:
    """The whole pass, restarted with half the batch after a CUDA out-of-memory in auto mode.
    Returns the largest batch used."""
    import torch

    first_layer = decoder_layers(loaded.model, cfg.model)[1][min(t.layer for t in targets)]
    batch_size, budget = _plan(cfg, loaded, targets, samples)
    pad_id = data_mod.pad_id(loaded.tokenizer, loaded.model.get_input_embeddings().num_embeddings)
    done = 0

    def tick(n: int, total: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(n, total)

    while True:
        batches = make_batches(samples, batch_size, budget)
        try:
            run_pass(loaded.model, acc, batches, pad_id, loaded.device, first_layer, tick, loss_scale)
            return max(len(b) for b in batches)
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, outside the except block, so the failed graph is freed first
        if cfg.batch_size is not None or max(len(b) for b in batches) == 1:
            raise SpinctlError(f"{cfg.model}: out of GPU memory at --batch-size {batch_size}; lower --batch-size "
                               f"or --max-length (longest sample: {len(batches[0][0].ids)} tokens)")
        acc.reset()
        torch.cuda.empty_cache()
        batch_size = max(1, batch_size // 2)
        budget = budget // 2 if budget else None
        tick(-done, len(samples))


def topk_entries(acc, nsamples: int, keep: float, model_path: Path, dtype) -> dict:
    """name -> top-K (indices, scores) from an accumulator's (all-reduced) statistics, one tensor at a time."""
    import torch

    entries = {}
    for name, s in acc.scores(nsamples):
        flat = s.reshape(-1)  # row-major flat index of [out, in]
        if not bool(torch.isfinite(flat).all()):
            raise SpinctlError(f"{model_path}: tensor {name}: scores overflow (NaN or inf) in {dtype}; retry with --dtype float32")
        entries[name] = topk_ranked(flat, keep_count(keep, flat.numel()))
    return entries


def write_score_file(cfg: ScoreConfig, entries: dict, rows, ckpt, dtype, shapes: dict, cal) -> dict:
    """The score file (docs/design.md §5) of `entries`, in target order; returns its metadata."""
    meta = score_meta(
        method=cfg.method.value, nsamples=cfg.nsamples, seed=cfg.seed, keep=cfg.keep, targets=cfg.targets,
        max_length=cfg.max_length, dtype=str(dtype).removeprefix("torch."), dataset_sha256=rows.sha256,
        dataset_rows=rows.count, fingerprint=ckpt.fingerprint(), shapes=shapes,
        samples=len(cal.samples), skipped=cal.skipped, chat_template=cfg.chat_template,
    )
    if not distributed.context().is_main:
        return meta  # under torchrun rank 0 alone writes: every rank holds the same all-reduced sums
    try:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        write_scores(cfg.output, entries, meta)
    except OSError as e:
        raise OutputError(f"{cfg.output}: cannot write the score file ({e.strerror or _one_line(e)})") from None
    return meta


def score(cfg: ScoreConfig, progress: Progress | None = None, *, loaded: LoadedModel | None = None) -> dict:
    """Score `cfg.data` on `cfg.model`, write `cfg.output`; returns the run summary.

    Under torchrun each rank scores its share of the samples, the accumulators are summed
    across ranks and rank 0 writes the file; a failure on any rank fails every rank, and
    rank 0's error names the rank (distributed.py). Other ranks return their own share's summary.

    Args:
        cfg: The validated options of the run (model, data, output, method, nsamples, seed,
            keep, targets, ...); with `cfg.stream` the layer-streamed path scores it
            (docs/design.md §10).
        progress: Optional callback `progress(advance, total)` counting samples (sample-layer
            steps with `cfg.stream`); a negative `advance` rewinds the bar when a pass
            restarts (out-of-memory retry, fp16 loss-scale overflow). Only rank 0's is called.
        loaded: A model and tokenizer already loaded by `load_model` for this model, reused
            so that several data sets share one load; ignored with `cfg.stream`.

    Returns:
        The summary dict. On rank 0 (or a single process): `file`, `method`, `tensors`,
        `samples`, `skipped`, `tokens`, `seconds`, `tokens_per_s`, `peak_memory_bytes`,
        `device`, `dtype`, `batch_size`, `pass_seconds`, `loss_scale` and `world_size`;
        `cfg.stream` adds `stream`, `spilled` and `activation_peak_bytes`. On other ranks:
        `file` None, `rank`, `method`, `samples`, `tokens`, `seconds`, `device`,
        `batch_size` (plus `stream`) and `world_size`.

    Raises:
        InputError: The data file is missing, malformed or too short for `cfg.nsamples`,
            no sample keeps a response token, the model directory or tokenizer cannot be
            read, or ranks read different data or models.
        OutputError: `cfg.output` is a directory, one of the run's inputs, or cannot be
            written.
        UnsupportedError: The device is not available, or the model cannot be loaded or
            scored (architecture, missing or reshaped weights, shared modules).
        SpinctlError: Out of memory (device or host), or scores that are not finite.
            Under torchrun also `RankFailed` (another rank failed) and
            `CommunicationError` (a collective failed or timed out).
    """
    import torch

    # snip needs autograd whatever mode the caller is in: under torch.no_grad() no gradient
    # reached the hooks, and inference mode would refuse to record one.
    with distributed.session() as ctx, torch.inference_mode(False), torch.enable_grad():
        summary = _score(cfg, progress if ctx.is_main else None, loaded, ctx)  # one progress bar: rank 0's
    return {**summary, "world_size": ctx.world_size}


def _score(cfg: ScoreConfig, progress: Progress | None, loaded: LoadedModel | None, ctx) -> dict:
    import torch

    t0 = time.perf_counter()
    if cfg.output.is_dir():
        raise OutputError(f"{cfg.output}: is a directory; -o takes a .safetensors file name")
    rows = data_mod.read_rows(cfg.data, cfg.prompt_column, cfg.response_column)  # bad data fails before the load
    picked = data_mod.select_rows(rows.count, cfg.nsamples, cfg.seed, rows.path)
    ckpt = open_checkpoint(cfg.model)
    inputs = [rows.path, *(s.path for s in ckpt.shards), *([ckpt.index_path] if ckpt.index_path else [])]
    if any(cfg.output.resolve() == p.resolve() for p in inputs):
        raise OutputError(f"{cfg.output}: is an input of this run; choose another -o")
    # First synchronisation point: a rank that failed to read is heard before the model loads.
    distributed.agree(ctx, " (data or model)", data_sha256=rows.sha256, model_fingerprint=ckpt.fingerprint())
    if cfg.stream:  # one decoder layer at a time, read from the shards; `loaded` is not used
        from spinctl.scoring.layerwise import score_streamed

        return score_streamed(cfg, rows, picked, ckpt, progress, t0)
    if loaded is None:
        loaded = load_model(cfg)
    model, device = loaded.model, loaded.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    cal = data_mod.encode(rows, picked, loaded.tokenizer, cfg.max_length, cfg.chat_template)
    samples = cal.samples

    targets = select_targets(model, cfg.targets, cfg.model)
    _check_checkpoint(cfg.model, ckpt, targets)
    try:
        acc = METHODS[cfg.method]({t.name: t.module for t in targets})
    except torch.cuda.OutOfMemoryError:
        gib = sum(t.module.weight.numel() for t in targets) * 4 / 2**30
        raise SpinctlError(f"{cfg.model}: no GPU memory left for the fp32 accumulators ({gib:.1f} GiB for "
                           f"{len(targets)} tensors); narrow --targets or use a larger GPU") from None
    local = distributed.shard_samples(samples, ctx)  # this rank's share, balanced by tokens
    distributed.agree(ctx, " (tokenizer)", samples=len(samples), tokens=cal.tokens)  # after the load: fail before the pass
    _sync(device)
    t_pass = time.perf_counter()
    scale_log2 = loss_scale_log2(loaded.dtype) if acc.needs_grad else 0
    while True:
        batch_size = _accumulate(cfg, loaded, acc, targets, local, progress, 2.0**scale_log2) if local else 0
        distributed.all_reduce_(acc.acc, ctx)  # Σ over ranks; a no-op in one process
        # Every rank sees the same sums, so every rank takes the same branch here.
        if scale_log2 == 0 or acc.all_finite():
            break
        scale_log2 = max(0, scale_log2 - LOSS_SCALE_STEP)  # overflowed: again, at a smaller scale
        acc.reset()
        if progress and local:
            progress(-len(local), len(local))
    acc.unscale_(2.0**scale_log2)
    if not ctx.is_main:  # rank 0 takes the top-K and writes the file
        return {"file": None, "rank": ctx.rank, "method": cfg.method.value, "samples": len(local),
                "tokens": sum(len(s.ids) for s in local), "seconds": round(time.perf_counter() - t0, 3),
                "device": str(device), "batch_size": batch_size}

    entries = topk_entries(acc, len(samples), cfg.keep, cfg.model, loaded.dtype)
    _sync(device)
    pass_seconds = time.perf_counter() - t_pass

    meta = write_score_file(cfg, entries, rows, ckpt, loaded.dtype, {t.name: list(t.module.weight.shape) for t in targets}, cal)
    tokens = cal.tokens
    return {
        "file": str(cfg.output), "method": cfg.method.value, "tensors": len(entries), "samples": len(samples),
        "skipped": cal.skipped, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 3),
        "tokens_per_s": round(tokens / pass_seconds, 1), "peak_memory_bytes": _peak_bytes(device),
        "device": str(device), "dtype": meta["dtype"], "batch_size": batch_size,
        "pass_seconds": round(pass_seconds, 3), "loss_scale": 2**scale_log2,
    }
