"""Read-ahead for `--stream`: the next layer's weights and the next batch's saved activations are
read (shards, spill files) on a worker thread, and on CUDA copied to the device on a side
stream, while the current layer computes on the compute stream (docs/design.md §10).

Usage: `ahead(key, fn)` starts fn on the worker; `take(key, fn)` returns its result (or runs fn
now if nothing was started for key). fn must only read: files, and host tensors the main thread
no longer writes. On CUDA the side stream first waits for everything the compute stream had
queued when `ahead` was called (a slot's device-to-host copy, say), and the compute stream
waits for the side stream's copies before it uses their result.

On by default on CUDA only. On CPU the reads are copies from the page cache, small next to a
layer's compute (two bench_stream runs, spilling: 1.005x and 0.955x with it on), while the
worker's buffers come from another glibc malloc arena that is not handed back to the system (+0.23 GB peak RSS on
bench_stream's model). SPINCTL_PREFETCH=1 turns it on anywhere (the tests, a CPU run spilling
to a slow disk), SPINCTL_PREFETCH=0 off (bench_stream's baseline on CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def enabled(device) -> bool:
    env = os.environ.get("SPINCTL_PREFETCH", "")
    return env == "1" if env in ("0", "1") else device.type == "cuda"


def copy_stream(device):
    """The side stream that carries --stream's copies both ways (here and layerwise_store.Boundaries),
    or None: on CPU, or with the read-ahead off (every copy on the compute stream, the baseline)."""
    import torch

    return torch.cuda.Stream(device) if device.type == "cuda" and enabled(device) else None


class Prefetcher:
    def __init__(self, device, side=None):
        """side: copy_stream(device) (made here if not given), shared with the store so that copies
        both ways keep one order."""
        self.device = device
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="spinctl-prefetch") if enabled(device) else None
        self.side = side if side is not None else copy_stream(device)
        self.pending: dict[Hashable, Future] = {}

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ahead(self, key: Hashable, fn: Callable[[], Any]) -> None:
        """Start fn() on the worker; its result is kept for `take(key, ...)`."""
        if self.pool is None or key in self.pending:
            return
        ready = None
        if self.side is not None:
            import torch

            ready = torch.cuda.current_stream(self.device).record_event()
        self.pending[key] = self.pool.submit(self._run, fn, ready)

    def take(self, key: Hashable, fn: Callable[[], Any]):
        """The result of the fn started for key (a failure there is raised here), else fn() now."""
        fut = self.pending.pop(key, None)
        if fut is None:
            return fn()
        out, done = fut.result()
        if done is not None:
            import torch

            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for t in out.values() if isinstance(out, dict) else (out,):
                t.record_stream(stream)  # made on the side stream, used and freed on this one
        return out

    def close(self) -> None:
        """Wait for a read in flight (its buffers and files stay valid until it ends); results not taken are dropped."""
        for fut in self.pending.values():
            fut.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _run(self, fn, ready):
        if self.side is None:
            return fn(), None
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.side):
            self.side.wait_event(ready)
            out = fn()
            return out, self.side.record_event()
