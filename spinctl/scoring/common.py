"""What the in-memory engine and the layerwise path share: batch sizes and loss scale, the
checkpoint check, device timing, the score file and the run summary."""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

from spinctl.config import ScoreConfig
from spinctl.errors import OutputError, UnsupportedError, one_line
from spinctl.io.formats import score_meta, write_scores
from spinctl.scoring import distributed
from spinctl.scoring.layerwise_store import HOST_FRACTION, host_memory_bytes

# Padded tokens per batch on CPU: past a few hundred the matrix products are as fast per
# token as they get, and the activations grow with it (SmolLM2 f32, 2 cores, 64 alpaca rows,
# one run each: 512-token batches 46 s, 1024-token 51 s, 8 whole samples 59 s at 3.5 GB).
CPU_TOKENS = 512
CUDA_TOKENS = 4096  # padded tokens per batch on CUDA: saturates an H200, keeps 7B under 64 GiB
MAX_BATCH = 64  # samples per batch, on either device
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


def plan_room(max_memory: int | None, device) -> tuple[int, int]:
    """(budget, room) for an auto batch plan: the peak it aims under (--max-memory, else half of
    host memory on CPU, what is allocated plus 85% of what this process may still take on
    CUDA), and how much of it is not in use yet (host RSS on CPU, allocated memory on CUDA).

    On CUDA "may still take" is the device's free memory plus what the allocator caches
    unused, capped by the process's share (set_per_process_memory_fraction) less what it holds.
    """
    import torch

    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        cached = torch.cuda.memory_reserved(device) - allocated  # the allocator's, reusable too
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)  # torch >= 2.6
        share = torch.cuda.get_device_properties(device).total_memory * fraction - allocated
        free = max(0, int(min(torch.cuda.mem_get_info(device)[0] + cached, share) * 0.85))
        budget = allocated + free if max_memory is None else max_memory
        return budget, max(0, min(free, budget - allocated))
    budget = int(HOST_FRACTION * host_memory_bytes()) if max_memory is None else max_memory
    return budget, max(0, budget - rss_bytes())


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_checkpoint(model_path: Path, ckpt, targets) -> None:
    """Scores are keyed by checkpoint tensor names: each scored weight must be stored as used."""
    for t in targets:
        entry = ckpt.tensors.get(t.name)
        if entry is None or list(entry.shape) != list(t.module.weight.shape):
            found = "missing" if entry is None else f"stored as {list(entry.shape)}"
            raise UnsupportedError(
                f"{model_path}: scored weight {t.name} {list(t.module.weight.shape)} is {found} in the "
                f"checkpoint; spinctl needs weights stored as the model uses them"
            )


def write_score_file(cfg: ScoreConfig, entries: dict, rows, ckpt, dtype, shapes: dict, cal) -> dict:
    """The score file (docs/design.md §5) of `entries`, in target order; returns its metadata."""
    meta = score_meta(
        method=cfg.method.value,
        nsamples=cfg.nsamples,
        seed=cfg.seed,
        keep=cfg.keep,
        targets=cfg.targets,
        max_length=cfg.max_length,
        dtype=str(dtype).removeprefix("torch."),
        dataset_sha256=rows.sha256,
        dataset_rows=rows.count,
        fingerprint=ckpt.fingerprint(),
        shapes=shapes,
        samples=len(cal.samples),
        skipped=cal.skipped,
        chat_template=cfg.chat_template,
    )
    if not distributed.context().is_main:
        return meta  # under torchrun rank 0 alone writes: every rank holds the same all-reduced sums
    try:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        write_scores(cfg.output, entries, meta)
    except OSError as e:
        raise OutputError(f"{cfg.output}: cannot write the score file ({e.strerror or one_line(e)})") from None
    return meta


@dataclass
class ScoreSummary:
    """What `score` returns, from either path. Ranks > 0 under torchrun fill only the first group."""

    file: str | None
    method: str
    samples: int
    tokens: int
    seconds: float
    device: str
    batch_size: int
    rank: int | None = None  # ranks > 0 only
    tensors: int | None = None
    skipped: int | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    dtype: str | None = None
    pass_seconds: float | None = None
    loss_scale: float | None = None
    memory_budget_bytes: int | None = None  # the auto plan's aim (not with --batch-size N)
    stream: bool | None = None  # the layerwise path only, from here on
    spilled: bool | None = None
    activation_peak_bytes: int | None = None

    def to_dict(self) -> dict:
        """The --json object: fields that do not apply to this run are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}
