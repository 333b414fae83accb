"""Data-parallel scoring under torchrun: rank context, sample sharding, failure exchange, accumulator all-reduce.

Single-process runs get a context with world_size 1 where every operation is a no-op
(and torch is never imported here for them).

Protocol (why no rank can hang on another's failure): every run of collectives starts
with `exchange`, a small all-gather in which each rank says whether it failed. A rank
whose code raises leaves its `session` through one last `exchange` carrying its error;
that call pairs with whatever `exchange` the other ranks reach next (the one inside
`all_reduce_`, a synchronisation point of `score`, or the closing one of their session),
so every rank learns of the failure there and raises: rank 0 with "rank N: <message>",
which the CLI prints as the job's one line. Collectives themselves time out
(SPINCTL_DIST_TIMEOUT seconds, default 1800) rather than wait forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from spinctl.errors import InputError, SpinctlError, UnsupportedError, one_line

TIMEOUT_ENV = "SPINCTL_DIST_TIMEOUT"
# Ranks wait for each other at each synchronisation point: model loads on different nodes
# can differ by minutes, and a long pass is balanced only to within one sample.
DEFAULT_TIMEOUT_S = 1800
BUCKET_BYTES = 64 << 20  # tensors below this are packed into one flat buffer per all-reduce call
STATUS_BYTES = 4096  # one rank's JSON status in `exchange`, space-padded
MAX_MESSAGE = 1500  # characters of an error message carried to rank 0


class RankFailed(SpinctlError):
    """Another rank of the job failed; the message names it and says why."""


class CommunicationError(SpinctlError):
    """A collective failed or timed out: a rank died, hung, or the network broke."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: global rank, number of ranks, rank within its node (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class _State:
    """Per-process job state: a failure reported once is not reported again; a broken group is left alone."""

    failure_reported = False
    broken = False
    # The tensors of the last exchange, referenced until the group is destroyed. Freed earlier,
    # gloo's worker thread would free their Python objects as it drops the finished work, needing
    # the GIL that destroy_process_group holds while it joins that thread: a deadlock at exit
    # (seen with torch 2.4 and 2.6; 2.13 does not show it).
    held: tuple = ()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise UnsupportedError(f"environment variable {name}={text!r}: expected an integer (set by torchrun)") from None


def context() -> DistContext:
    """The current process's place in the job: from torchrun's WORLD_SIZE, RANK and LOCAL_RANK
    (or an already initialised process group); world_size 1 outside torchrun."""
    dist = sys.modules.get("torch.distributed")  # only ask torch if something already imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise UnsupportedError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    return DistContext(rank, world, local)


def timeout_seconds() -> int:
    value = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if value < 1:
        raise UnsupportedError(f"{TIMEOUT_ENV}={value}: must be a positive number of seconds")
    return value


def is_main_process() -> bool:
    """Whether this process speaks for the job (prints results): rank 0 under torchrun, or a
    single process. Never raises, so error handlers can ask."""
    try:
        return context().is_main
    except SpinctlError:
        return True


def failure_reported() -> bool:
    """True once this process has learnt, through an exchange, that the job failed: rank 0 reports
    it, so other ranks can exit quietly."""
    return _State.failure_reported


def describe(e: BaseException) -> str:
    """One line for an exception, worded as the CLI words it."""
    if isinstance(e, SpinctlError):
        return one_line(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return f"{type(e).__name__}: {one_line(e)}"


def _backend() -> str:
    import torch
    import torch.distributed as dist

    # One group, two transports: CPU tensors (statuses, CPU accumulators) over gloo, CUDA
    # accumulators over NCCL; NCCL starts lazily, so a --device cpu run never touches it.
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _init(ctx: DistContext) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise UnsupportedError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if torch.cuda.is_available() and ctx.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(ctx.local_rank)  # NCCL and object collectives use the current device
    # torch's compiler stack, imported while a group is live (transformers does so when it loads a
    # model), keeps references to the group past destroy_process_group; its gloo threads then abort
    # the process at exit ("terminate called without an active exception", in 1 run of 3 here; see
    # pytorch/pytorch#190489). Imported first, it holds none. Loading a model imports it anyway.
    import torch._dynamo  # noqa: F401

    try:
        dist.init_process_group(_backend(), timeout=timedelta(seconds=timeout_seconds()))
    except Exception as e:  # DistError, RuntimeError, ValueError: all mean "could not join"
        raise CommunicationError(
            f"rank {ctx.rank}: cannot join the torch.distributed job of {ctx.world_size} ranks "
            f"({one_line(e)}); check the torchrun --rdzv-endpoint / MASTER_ADDR and that "
            f"every node started"
        ) from None
    _State.failure_reported = False
    _State.broken = False


@contextlib.contextmanager
def session() -> Iterator[DistContext]:
    """The job's process group for the duration of the block (created here unless one exists, and
    then destroyed here). An exception inside is exchanged with the other ranks on the way out,
    and a clean exit is a synchronisation point too, so every rank ends the block the same way."""
    ctx = context()
    if not ctx.enabled:
        yield ctx
        return
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        _init(ctx)
    try:
        yield ctx
    except Exception as e:
        if not (_State.failure_reported or _State.broken):
            with contextlib.suppress(CommunicationError):  # no one to tell: this rank's own error stands
                exchange(ctx, error=e)  # raises e here; the others raise RankFailed at their next exchange
        raise
    else:
        exchange(ctx)  # a rank that failed after this one's last synchronisation point is heard here
    finally:
        if owned and not _State.broken and dist.is_initialized():
            dist.destroy_process_group()
        _State.held = ()


def _encode(error: str | None, facts: dict) -> bytes:
    data = json.dumps({"error": error, "facts": facts}, sort_keys=True).encode()
    if len(data) > STATUS_BYTES:
        raise ValueError(f"status of {len(data)} bytes exceeds {STATUS_BYTES}; keep exchange facts small")
    return data.ljust(STATUS_BYTES)  # json.loads ignores the padding spaces


def exchange(ctx: DistContext, error: BaseException | None = None, **facts: Any) -> list[dict]:
    """A synchronisation point: every rank sends whether it failed (`error`) and small JSON `facts`;
    returns every rank's facts, in rank order. If any rank failed, raises on every rank: the
    rank's own `error` where it has one, otherwise RankFailed naming the lowest failed rank."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return [facts]
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("distributed.exchange needs the process group: call it inside distributed.session()")
    message = None if error is None else describe(error)[:MAX_MESSAGE]
    mine = torch.frombuffer(bytearray(_encode(message, facts)), dtype=torch.uint8)  # CPU: gloo carries it
    everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    _collective(ctx, lambda: dist.all_gather(everyone, mine))
    _State.held = (mine, everyone)
    statuses = [json.loads(bytes(t.numpy()).decode()) for t in everyone]
    failed = [(r, s["error"]) for r, s in enumerate(statuses) if s["error"] is not None]
    if failed:
        _State.failure_reported = True
        if error is not None:
            raise error
        rank, text = failed[0]
        more = f" (ranks {', '.join(str(r) for r, _ in failed[1:])} failed too)" if len(failed) > 1 else ""
        raise RankFailed(f"rank {rank}: {text}{more}")
    return [s["facts"] for s in statuses]


def agree(ctx: DistContext, what: str = "", **facts: Any) -> None:
    """`exchange`, then check that every rank reported the same `facts` (JSON values): ranks that
    read different data or models would otherwise sum unrelated statistics."""
    everyone = exchange(ctx, **facts)
    for rank, theirs in enumerate(everyone[1:], start=1):
        for key in facts:
            if theirs.get(key) != everyone[0].get(key):
                _State.failure_reported = True  # every rank sees the same lists and raises the same error
                raise InputError(
                    f"rank {rank}: {key} {theirs.get(key)!r} differs from rank 0's "
                    f"{everyone[0].get(key)!r}{what}; every rank needs the same files and options"
                )


def _collective(ctx: DistContext, call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception as e:  # DistBackendError, RuntimeError on a closed connection or a timeout
        _State.broken = True  # every rank prints its own view: the one that died may be rank 0
        raise CommunicationError(
            f"rank {ctx.rank}: lost contact with the other ranks ({one_line(e)}); a rank died, "
            f"hung for over {timeout_seconds()} s ({TIMEOUT_ENV}) or the network failed"
        ) from None


def shard_plan(lengths: Sequence[int], world_size: int) -> list[int]:
    """The rank of each sample: longest first, each to the rank with the fewest tokens so far
    (ties to the lower rank, then the earlier sample). Deterministic, and no two ranks' token
    counts differ by more than the longest sample."""
    owner = [0] * len(lengths)
    loads = [(0, r) for r in range(world_size)]  # heap of (tokens, rank)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        tokens, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (tokens + lengths[i], rank))
    return owner


def shard_samples(samples: list, ctx: DistContext, size: Callable[[Any], int] = lambda s: len(s.ids)) -> list:
    """This rank's share of the samples, balanced by token count, in their original order (all of
    them in a single process). A rank may get none when there are fewer samples than ranks."""
    if not ctx.enabled:
        return samples
    owner = shard_plan([size(s) for s in samples], ctx.world_size)
    return [s for s, r in zip(samples, owner) if r == ctx.rank]


def _buckets(tensors: dict, bucket_bytes: int) -> list[list[str]]:
    """Names in a fixed order (sorted: dicts built differently still line up across ranks), grouped
    into all-reduce calls: a tensor of `bucket_bytes` or more alone (reduced in place, no copy),
    smaller ones packed per (device, dtype) up to `bucket_bytes` in all."""
    out: list[list[str]] = []
    open_: dict[tuple, list[str]] = {}
    used: dict[tuple, int] = {}
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        if size >= bucket_bytes:
            out.append([name])
            continue
        key = (str(t.device), t.dtype)
        if key in open_ and used[key] + size > bucket_bytes:
            out.append(open_.pop(key))
        if key not in open_:
            open_[key], used[key] = [], 0
        open_[key].append(name)
        used[key] += size
    return out + list(open_.values())


def all_reduce_(tensors: dict, ctx: DistContext, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum `tensors` (name -> contiguous tensor; any devices and dtypes) across ranks in place;
    a no-op in a single process. Extra memory stays under `bucket_bytes` per (device, dtype):
    large tensors are reduced in place, small ones through one reused flat buffer."""
    if not ctx.enabled:
        return
    import torch
    import torch.distributed as dist

    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"all_reduce_: tensor {name} is not contiguous")
    plan = _buckets(tensors, bucket_bytes)
    alone = lambda group: (
        len(group) == 1 and tensors[group[0]].numel() * tensors[group[0]].element_size() >= bucket_bytes
    )  # noqa: E731
    buffers = {}  # allocated before the exchange: nothing can fail between it and the collectives
    for group in plan:
        if not alone(group):
            t = tensors[group[0]]
            key = (str(t.device), t.dtype)
            n = sum(tensors[g].numel() for g in group)
            if key not in buffers or buffers[key].numel() < n:
                buffers[key] = torch.empty(n, dtype=t.dtype, device=t.device)
    layout = [[n, str(tensors[n].dtype), list(tensors[n].shape), tensors[n].device.type] for n in sorted(tensors)]
    agree(ctx, " (accumulator layout)", accumulators=hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16])

    def reduce_all() -> None:
        for group in plan:
            first = tensors[group[0]]
            if alone(group):
                dist.all_reduce(first)  # in place
                continue
            flat = buffers[(str(first.device), first.dtype)][: sum(tensors[g].numel() for g in group)]
            views, at = [], 0
            for g in group:  # copies into slices of the buffer: no allocation inside the loop
                n = tensors[g].numel()
                views.append(flat[at : at + n])
                views[-1].copy_(tensors[g].reshape(-1))
                at += n
            dist.all_reduce(flat)
            for g, v in zip(group, views):
                tensors[g].copy_(v.view_as(tensors[g]))

    _collective(ctx, reduce_all)
