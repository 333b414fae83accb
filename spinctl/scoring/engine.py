"""`spinctl score`: one batched pass over the calibration samples, top-K per weight, a score file."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from spinctl.config import Method, ScoreConfig
from spinctl.errors import OutputError, SpinctlError
from spinctl.io.checkpoint import open_checkpoint
from spinctl.io.files import check_creatable, refuse_input_as_output
from spinctl.io.formats import check_replaceable, keep_count
from spinctl.runtime import LoadedModel, load_model
from spinctl.scoring import data as data_mod
from spinctl.scoring import distributed
from spinctl.scoring.common import (
    CPU_TOKENS,
    CUDA_TOKENS,
    LOSS_SCALE_STEP,
    MAX_BATCH,
    ScoreSummary,
    check_checkpoint,
    loss_scale_log2,
    make_batches,
    peak_bytes,
    plan_room,
    sync,
    write_score_file,
)
from spinctl.scoring.methods import METHODS, PLAIN_HEAD, response_loss
from spinctl.scoring.targets import decoder_layers, select_targets

Progress = Callable[[int, int], None]  # progress(advance_samples, total); advance < 0 rewinds after an OOM retry


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


class _Stop(Exception):
    """Raised by a hook on the last scored layer: wanda needs nothing above it."""


def _stop(module, args, output):
    raise _Stop


def run_pass(
    model,
    acc,
    batches: list[list],
    pad_id: int,
    device,
    span,
    progress: Progress | None = None,
    loss_scale: float = 1.0,
) -> None:
    """Feed every batch through the model with `acc` hooked in (snip: forward + backward).

    span: (lowest, highest) scored decoder layer modules. snip's gradients start at the
    lowest one's input; wanda's forward stops after the highest. No attention mask: with
    right padding and causal attention no real position sees a pad, pad logits carry no
    loss, so pad gradients are exactly zero; the kernels stay the unmasked (flash) ones.
    """
    import torch

    total = sum(len(b) for b in batches)
    first, last = span
    if acc.needs_grad:
        hook = first.register_forward_pre_hook(_grad_from_here, with_kwargs=True)
        head = model.get_output_embeddings() if getattr(model.config, "model_type", None) in PLAIN_HEAD else None
    else:
        hook = last.register_forward_hook(_stop)
    try:
        with acc:
            for batch in batches:
                ids, labels, positions = collate(batch, pad_id, device)
                acc.begin_batch(len(batch), positions)
                if not acc.needs_grad:
                    with torch.no_grad(), contextlib.suppress(_Stop):
                        model.base_model(input_ids=ids, use_cache=False)
                elif head is not None:  # the head on response positions only
                    from spinctl.scoring.head import head_loss

                    hidden = model.base_model(input_ids=ids, use_cache=False)[0]  # [B, T, D], final norm applied
                    head_loss(hidden, labels, head, loss_scale).backward()
                    del hidden
                else:  # logits post-processed past lm_head (soft-capping, scales): the model's own forward
                    logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
                    (response_loss(logits, labels) * loss_scale).backward()
                    del logits
                if progress:
                    progress(len(batch), total)
    finally:
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
    """(samples per batch, padded-token budget per batch or None): the largest batches whose
    estimated memory fits the room `plan_room` leaves, capped where throughput stops growing."""
    if cfg.batch_size is not None:
        return cfg.batch_size, None
    from spinctl.scoring import abs_grad_triton

    cuda = loaded.device.type == "cuda"
    c, item = loaded.model.config, loaded.dtype.itemsize
    D = getattr(c, "hidden_size", 4096)
    inter = getattr(c, "intermediate_size", None) or 4 * D
    if cfg.method is Method.SNIP:
        # Saved activations per layer and token: 2 norms ≈ 6·D, q/k/v after RoPE and GQA expansion
        # ≈ 3·D, attention ≈ 4·D, the hooked inputs ≈ D, MLP ≈ 4·I (SmolLM2 f32 measured 2.3 MB a
        # token with full logits, ~1.7 MB of it the layers); head.py keeps the logits to a chunk.
        per_token = getattr(c, "num_hidden_layers", 32) * (14 * D + 4 * inter) * item
        bmm = cuda and not abs_grad_triton.available()  # the fallback's [B, out, in] product
        per_sample = max(t.module.weight.numel() for t in targets) * item if bmm else 0
    else:  # wanda keeps no activations: one layer's transient ones
        per_token, per_sample = (4 * D + 3 * inter) * item, 0
    room = plan_room(cfg.max_memory, loaded.device)[1]
    longest = max(len(s.ids) for s in samples)
    batch = max(1, min(MAX_BATCH, int(room // (longest * per_token + per_sample))))
    return batch, max(longest, min(CUDA_TOKENS if cuda else CPU_TOKENS, int(room // per_token)))


def _accumulate(
    cfg: ScoreConfig, loaded: LoadedModel, acc, targets, samples, progress: Progress | None, loss_scale: float = 1.0
) -> int:
    """The whole pass, restarted with half the batch after a CUDA out-of-memory in auto mode.
    Returns the largest batch used."""
    import torch

    layers = decoder_layers(loaded.model, cfg.model)[1]
    span = (layers[min(t.layer for t in targets)], layers[max(t.layer for t in targets)])
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
            run_pass(loaded.model, acc, batches, pad_id, loaded.device, span, tick, loss_scale)
            return max(len(b) for b in batches)
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, outside the except block, so the failed graph is freed first
        if cfg.batch_size is not None or max(len(b) for b in batches) == 1:
            raise SpinctlError(
                f"{cfg.model}: out of GPU memory at --batch-size {batch_size}; lower --batch-size "
                f"or --max-length (longest sample: {len(batches[0][0].ids)} tokens)"
            )
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
            raise SpinctlError(
                f"{model_path}: tensor {name}: scores overflow (NaN or inf) in {dtype}; retry with --dtype float32"
            )
        entries[name] = topk_ranked(flat, keep_count(keep, flat.numel()))
    return entries


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
    refuse_input_as_output(cfg.output, inputs, [cfg.model] if cfg.model.is_dir() else [])
    check_creatable(cfg.output, "the score file")
    check_replaceable(cfg.output, "scores")
    # First synchronisation point: a rank that failed to read is heard before the model loads.
    distributed.agree(ctx, " (data or model)", data_sha256=rows.sha256, model_fingerprint=ckpt.fingerprint())
    if cfg.stream:  # one decoder layer at a time, read from the shards; `loaded` is not used
        from spinctl.scoring.layerwise import score_streamed

        return score_streamed(cfg, rows, picked, ckpt, progress, t0)
    if loaded is None:
        loaded = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code)
    model, device = loaded.model, loaded.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    cal = data_mod.encode(rows, picked, loaded.tokenizer, cfg.max_length, cfg.chat_template)
    samples = cal.samples

    targets = select_targets(model, cfg.targets, cfg.model)
    check_checkpoint(cfg.model, ckpt, targets)
    try:
        acc = METHODS[cfg.method]({t.name: t.module for t in targets})
    except torch.cuda.OutOfMemoryError:
        gib = sum(t.module.weight.numel() for t in targets) * 4 / 2**30
        raise SpinctlError(
            f"{cfg.model}: no GPU memory left for the fp32 accumulators ({gib:.1f} GiB for "
            f"{len(targets)} tensors); narrow --targets or use a larger GPU"
        ) from None
    local = distributed.shard_samples(samples, ctx)  # this rank's share, balanced by tokens
    distributed.agree(
        ctx, " (tokenizer)", samples=len(samples), tokens=cal.tokens
    )  # after the load: fail before the pass
    sync(device)
    t_pass = time.perf_counter()
    budget = None if cfg.batch_size else plan_room(cfg.max_memory, device)[0]  # what the auto plan aims under
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
        return ScoreSummary(
            None,
            cfg.method.value,
            len(local),
            sum(len(s.ids) for s in local),
            round(time.perf_counter() - t0, 3),
            str(device),
            batch_size,
            rank=ctx.rank,
        ).to_dict()

    entries = topk_entries(acc, len(samples), cfg.keep, cfg.model, loaded.dtype)
    sync(device)
    pass_seconds = time.perf_counter() - t_pass

    meta = write_score_file(
        cfg, entries, rows, ckpt, loaded.dtype, {t.name: list(t.module.weight.shape) for t in targets}, cal
    )
    return ScoreSummary(
        str(cfg.output),
        cfg.method.value,
        len(samples),
        cal.tokens,
        round(time.perf_counter() - t0, 3),
        str(device),
        batch_size,
        tensors=len(entries),
        skipped=cal.skipped,
        tokens_per_s=round(cal.tokens / pass_seconds, 1),
        peak_memory_bytes=peak_bytes(device),
        dtype=meta["dtype"],
        pass_seconds=round(pass_seconds, 3),
        loss_scale=2**scale_log2,
        memory_budget_bytes=budget,
    ).to_dict()
