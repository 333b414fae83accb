"""`spinctl score --stream`: layer-streamed scoring, one decoder layer on the device at a time, for models larger than memory.

Forward sweep: embeddings (with the layers' arguments caught), then layer by layer over all
batches, each layer's input kept for every batch (host memory, or files under --spill-dir);
snip then runs the final norm, lm_head and loss and keeps dL/dh at the top. Backward sweep
(snip), last layer to the lowest scored one: reload the layer, recompute its forward from the
saved input with grad, backpropagate the saved output gradient with the per-sample |grad|
accumulator hooked on that layer only, take the layer's top-K, free it, and keep the input
gradient in the slot of the input it replaces. wanda needs the forward sweep only.

Same samples, batches, accumulators (methods.py) and top-K (score.py) as in-memory scoring,
so the same score file up to float rounding. Progress counts sample-layer steps:
`progress(batch_samples, samples · steps)` with steps = 1 (embeddings) + layers run forward
+ 1 (head, snip) + layers run backward (snip), so the bar ends at its total.
"""

from __future__ import annotations

import contextlib
import os
import time

from spinctl import runtime
from spinctl.errors import SpinctlError
from spinctl.scoring import data as data_mod
from spinctl.scoring import distributed, layerwise_store
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
from spinctl.scoring.layerwise_model import build_skeleton, call_layer, catch_layer_inputs
from spinctl.scoring.layerwise_store import Boundaries
from spinctl.scoring.methods import METHODS, Method
from spinctl.scoring.prefetch import Prefetcher, copy_stream
from spinctl.scoring.targets import select_targets

HEAD_BYTES = 256 << 20  # the head's working memory: a chunk of logits (head.CHUNK_BYTES), its softmax, temporaries


class _Overflow(Exception):
    """A layer's scaled fp16 gradients overflowed: the sweeps start again at a smaller loss scale."""


def plan_batches(cfg, sk, targets, samples) -> tuple[int, int | None]:
    """(samples per batch, padded-token budget or None): on CPU the throughput cap (the host
    activations are checked by check_host_memory); on CUDA sized for one layer's activations
    within the room common.plan_room leaves (the process's share of the device, --max-memory)."""
    if cfg.batch_size is not None:
        return cfg.batch_size, None
    if sk.device.type != "cuda":  # one layer's activations at a time: the throughput cap rules
        return MAX_BATCH, CPU_TOKENS
    c, item = sk.model.config, sk.dtype.itemsize
    D = c.hidden_size
    inter = getattr(c, "intermediate_size", None) or 4 * D
    # One layer's saved activations and their gradients, and the next batch's input and output
    # gradient read ahead (prefetch.py).
    per_token = (2 * (9 * D + 4 * inter) + 2 * D) * item
    per_sample = max(t.module.weight.numel() for t in targets) * (item + 4)  # a per-sample weight gradient, fp32 copy
    layer = max(sum(p.numel() for p in lay.parameters()) for lay in sk.layers) * item
    outer = (
        max(sum(g[0][0]._parameters[g[0][1]].numel() for g in sk.param_groups(part)) for part in ("embed", "head"))
        * item
    )
    acc = max(sum(t.module.weight.numel() for t in targets if t.layer == i) for i in range(len(sk.layers))) * 4
    free = max(0, plan_room(cfg.max_memory, sk.device)[1] - 2 * layer - outer - acc - HEAD_BYTES)
    longest = max((len(s.ids) for s in samples), default=1)
    batch = max(1, min(MAX_BATCH, int(free // (longest * per_token + per_sample))))
    return batch, max(longest, min(CUDA_TOKENS, int(free // per_token)))


def check_host_memory(cfg, sk, batches, first: int, pinned: bool) -> None:
    """Before the pass: the boundary activations kept in host memory must fit in HOST_FRACTION of it.

    snip keeps every boundary from the lowest scored layer's input up (L - first + 1 of them,
    two while the layers below it run); wanda two at a time. The ranks on one node
    (torchrun's LOCAL_WORLD_SIZE) share its memory.
    """
    L = len(sk.layers)
    slots = max(2, L - first + 1) if cfg.method is Method.SNIP else 2
    shapes = [(len(b), len(b[0].ids)) for b in batches]  # [B, T]: batches are padded to their first (longest)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    need = ranks * layerwise_store.activation_bytes(
        shapes, sk.model.config.hidden_size, sk.dtype.itemsize, slots, pinned
    )
    ram = layerwise_store.host_memory_bytes()
    if need > layerwise_store.HOST_FRACTION * ram:
        per_node = f", {ranks} ranks on this node" if ranks > 1 else ""
        raise SpinctlError(
            f"{cfg.model}: --stream would keep about {need / 2**30:.1f} GiB of layer activations in host "
            f"memory ({slots} layer boundaries of {sum(n for n, _ in shapes)} samples{per_node}"
            f"{', pinned' if pinned else ''}), more than half of this machine's {ram / 2**30:.1f} GiB; "
            f"add --spill-dir DIR (a disk with that much room), or lower --nsamples or --max-length"
        )


class _Sweeps:
    """The two sweeps over one model and one set of batches; `entries` collects top-K per weight."""

    def __init__(self, cfg, sk, targets, batches, store, pf, nsamples: int, progress, ctx, loss_scale: float = 1.0):
        self.cfg, self.sk, self.batches, self.store, self.pf = cfg, sk, batches, store, pf
        self.loss_scale = loss_scale  # snip: the head's loss is multiplied by it (score.LOSS_SCALE_LOG2)
        self.nsamples = nsamples  # all samples of the run (wanda's N), whatever this rank scores
        self.by_layer: dict[int, dict] = {}
        for t in targets:
            self.by_layer.setdefault(t.layer, {})[t.name] = t.module
        self.snip = cfg.method is Method.SNIP
        self.L = len(sk.layers)
        self.first, self.last = min(self.by_layer), max(self.by_layer)
        self.n_fwd = self.L if self.snip else self.last + 1  # wanda: nothing above the last scored layer
        steps = 1 + self.n_fwd + (1 + self.L - self.first if self.snip else 0)
        self.total = sum(len(b) for b in batches) * steps
        self.progress = progress
        self.done = 0  # progress reported so far, rewound if the sweeps start again
        self.ctx = ctx  # distributed.DistContext: accumulators are summed across ranks per layer
        self.entries: dict = {}
        self.calls: list = []  # per batch: per layer (by_kw, args, kwargs)
        self.labels: list = []  # per batch: [B, T]
        self.positions: list = []  # per batch: [B, T] bool, response positions

    def _tick(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(n, self.total)

    def _accumulator(self, layer: int):
        modules = self.by_layer.get(layer)
        return METHODS[self.cfg.method](modules) if modules else None

    def _load(self, part, nxt=None) -> None:
        """A part onto the device (its read started while the one before computed), and part
        nxt's read started."""
        sk = self.sk
        sk.load(part, self.pf.take(("part", part), lambda: sk.fetch(part)))
        if nxt is not None:
            self.pf.ahead(("part", nxt), lambda: sk.fetch(nxt))

    def _get(self, slot: int, b: int):
        """store.get(slot, b), read while batch b - 1 computed; batch b + 1's read started."""
        store = self.store
        x = self.pf.take(("slot", slot, b), lambda: store.get(slot, b))
        if store.get_copies and b + 1 < len(self.batches):  # else there is nothing to read ahead
            self.pf.ahead(("slot", slot, b + 1), lambda: store.get(slot, b + 1))
        return x

    def _finish(self, acc) -> None:
        """All-reduce (a no-op in one process), then rank 0 takes this layer's top-K; the accumulators go."""
        from spinctl.scoring.engine import topk_entries

        distributed.all_reduce_(acc.acc, self.ctx)
        if self.loss_scale != 1:  # every rank sees the same sums: all raise, or none
            if not acc.all_finite():
                raise _Overflow
            acc.unscale_(self.loss_scale)
        if self.ctx.is_main:
            self.entries.update(topk_entries(acc, self.nsamples, self.cfg.keep, self.cfg.model, self.sk.dtype))

    def catch(self, pad_id: int) -> None:
        """Embeddings of every batch into slot 0, and the arguments each layer receives."""
        from spinctl.scoring.engine import collate

        sk = self.sk
        self._load("embed", 0)
        for b, batch in enumerate(self.batches):
            ids, labels, positions = collate(batch, pad_id, sk.device)
            hidden, calls = catch_layer_inputs(sk, ids)
            self.store.put(0, b, hidden)
            self.calls.append(calls)
            self.labels.append(labels)
            self.positions.append(positions)
            self._tick(len(batch))
        sk.unload("embed")

    def forward(self) -> None:
        import torch

        sk, store = self.sk, self.store
        for l in range(self.n_fwd):
            self._load(l, l + 1 if l + 1 < self.n_fwd else "head" if self.snip else None)
            acc = None if self.snip else self._accumulator(l)
            with acc if acc is not None else contextlib.nullcontext(), torch.no_grad():
                for b, batch in enumerate(self.batches):
                    x = self._get(l, b)  # [B, T, D]
                    if acc is not None:
                        acc.begin_batch(len(batch), self.positions[b])
                    y = call_layer(sk.layers[l], x, self.calls[b][l])
                    if self.snip or l + 1 < self.n_fwd:
                        store.put(l + 1, b, y)
                    self._tick(len(batch))
            if acc is not None:
                self._finish(acc)
                del acc
            if not self.snip or l < self.first:
                store.drop(l)  # no backward through it: its input is not needed again
            if not (self.snip and l == self.L - 1):
                sk.unload(l)  # the top layer stays: the backward sweep starts there

    def head(self) -> None:
        """Final norm, lm_head, Σ per-sample loss; slot L becomes dL/dh_L [B, T, D] (head.py keeps
        the logits to a chunk of response rows at a time)."""
        import torch

        from spinctl.scoring.head import head_loss

        sk, store = self.sk, self.store
        self._load("head")
        norm, lm_head = sk.head()
        for b, batch in enumerate(self.batches):
            h = self._get(self.L, b).detach().requires_grad_()  # [B, T, D]
            with torch.enable_grad():
                head_loss(norm(h), self.labels[b], lm_head, self.loss_scale).backward()  # row s: dL_s/dh_s
            store.put(self.L, b, h.grad)
            self._tick(len(batch))
        sk.unload("head")

    def backward(self) -> None:
        import torch

        sk, store = self.sk, self.store
        for l in range(self.L - 1, self.first - 1, -1):
            self._load(l, l - 1 if l > self.first else None)
            acc = self._accumulator(l)
            with acc if acc is not None else contextlib.nullcontext(), torch.enable_grad():
                for b, batch in enumerate(self.batches):
                    x = self._get(l, b).detach().requires_grad_()  # [B, T, D], the saved input
                    g = self._get(l + 1, b)  # [B, T, D], dL/d(output)
                    if acc is not None:
                        acc.begin_batch(len(batch), self.positions[b])
                    call_layer(sk.layers[l], x, self.calls[b][l]).backward(g)  # hooks add Σ_b |gy_bᵀ x_b|
                    if l > self.first:
                        store.put(l, b, x.grad)  # overwrites the input it came from: no extra memory
                    del x, g
                    self._tick(len(batch))
            store.drop(l + 1)
            if acc is not None:
                self._finish(acc)
                del acc
            sk.unload(l)
        store.drop(self.first)


def score_streamed(cfg, rows, picked, ckpt, progress=None, t0: float | None = None) -> dict:
    """Layer-streamed `score`: the caller has read the data and opened the checkpoint; writes `cfg.output`."""
    import torch

    t0 = time.perf_counter() if t0 is None else t0
    runtime.check_model_dir(cfg.model)
    device = runtime.resolve_device(cfg.device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    tokenizer = runtime.load_tokenizer(cfg.model, cfg.trust_remote_code)
    sk = build_skeleton(cfg.model, ckpt, tokenizer, device, dtype, cfg.trust_remote_code)
    cal = data_mod.encode(rows, picked, tokenizer, cfg.max_length, cfg.chat_template)
    targets = select_targets(sk.model, cfg.targets, cfg.model)
    check_checkpoint(cfg.model, ckpt, targets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ordered = sorted(cal.samples, key=lambda s: -len(s.ids))  # make_batches' order; each rank takes its share
    ctx = distributed.context()
    local = distributed.shard_samples(ordered, ctx)
    batch_size, budget = plan_batches(cfg, sk, targets, local)
    batches = make_batches(local, batch_size, budget)
    pad_id = data_mod.pad_id(tokenizer, sk.model.get_input_embeddings().num_embeddings)
    if cfg.spill_dir is None:
        check_host_memory(cfg, sk, batches, min(t.layer for t in targets), device.type == "cuda")

    t_pass = time.perf_counter()
    scale_log2 = loss_scale_log2(dtype) if cfg.method is Method.SNIP else 0
    while True:
        # The prefetcher closes first: a read in flight may still use the store.
        side = copy_stream(device)  # CUDA: boundary and weight copies off the compute stream
        with Boundaries(device, cfg.spill_dir, side) as store, Prefetcher(device, side) as pf:
            sweeps = _Sweeps(cfg, sk, targets, batches, store, pf, len(cal.samples), progress, ctx, 2.0**scale_log2)
            try:
                sweeps.catch(pad_id)
                sweeps.forward()
                if sweeps.snip:
                    sweeps.head()
                    sweeps.backward()
                break
            except torch.cuda.OutOfMemoryError:
                raise SpinctlError(
                    f"{cfg.model}: out of GPU memory with --stream at batches of up to {batch_size} "
                    f"samples; lower --batch-size or --max-length"
                ) from None
            except _Overflow:  # raised only while the scale is above 1
                scale_log2 = max(0, scale_log2 - LOSS_SCALE_STEP)
                for layer in range(len(sk.layers)):
                    sk.unload(layer)  # the layer that overflowed is still on the device
                if progress:
                    progress(-sweeps.done, sweeps.total)
            finally:
                host_peak = store.peak_bytes
    sync(device)
    pass_seconds = time.perf_counter() - t_pass

    batch_size = max((len(b) for b in batches), default=0)
    if not ctx.is_main:  # rank 0 took the top-K and writes the file
        return ScoreSummary(
            None,
            cfg.method.value,
            len(local),
            sum(len(s.ids) for s in local),
            round(time.perf_counter() - t0, 3),
            str(device),
            batch_size,
            rank=ctx.rank,
            stream=True,
        ).to_dict()
    entries = {t.name: sweeps.entries[t.name] for t in targets}  # layer then module order, as in-memory
    meta = write_score_file(
        cfg, entries, rows, ckpt, dtype, {t.name: list(t.module.weight.shape) for t in targets}, cal
    )
    return ScoreSummary(
        str(cfg.output),
        cfg.method.value,
        len(cal.samples),
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
        stream=True,
        spilled=cfg.spill_dir is not None,
        activation_peak_bytes=host_peak,
    ).to_dict()
