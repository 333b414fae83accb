"""Batch plans: for CUDA run with the device's memory queries faked (the arithmetic a GPU run
depends on executes on every machine, not first on the GPU), and for CPU with the host's."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

GiB = 2**30


def auto(method: str = "snip", max_memory: int | None = None) -> SimpleNamespace:
    """The options a plan reads, with --batch-size auto."""
    from spinctl.config import Method

    return SimpleNamespace(batch_size=None, max_memory=max_memory, method=Method(method))


AUTO = auto()


@pytest.fixture
def fake_cuda(monkeypatch):
    """The memory a fake CUDA device reports; tests change the dict."""
    import torch

    mem = dict(free=80 * GiB, total=141 * GiB, fraction=1.0, allocated=0, reserved=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (mem["free"], mem["total"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: mem["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: mem["reserved"])
    monkeypatch.setattr(
        torch.cuda, "get_per_process_memory_fraction", lambda dev=None: mem["fraction"], raising=False
    )  # torch >= 2.6
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda dev=None: SimpleNamespace(total_memory=mem["total"])
    )
    return mem


def samples(*lengths):
    return [SimpleNamespace(ids=[0] * n) for n in lengths]


@pytest.fixture
def on_cuda(tiny_model):
    """(model dir, in-memory LoadedModel, streaming Skeleton), loaded on CPU and labelled cuda."""
    import torch

    from spinctl.io.checkpoint import open_checkpoint
    from spinctl.runtime import LoadedModel, load_model, load_tokenizer
    from spinctl.scoring.layerwise_model import build_skeleton

    path = tiny_model()
    cuda = torch.device("cuda")
    loaded = load_model(path, "cpu", "bfloat16")
    sk = build_skeleton(path, open_checkpoint(path), load_tokenizer(path), torch.device("cpu"), torch.bfloat16)
    return (
        path,
        LoadedModel(path, loaded.model, loaded.tokenizer, cuda, torch.bfloat16),
        dataclasses.replace(sk, device=cuda),
    )


def check_plan(plan, longest: int) -> None:
    from spinctl.scoring.common import MAX_BATCH

    batch, budget = plan
    assert 1 <= batch <= MAX_BATCH and budget >= longest


def test_in_memory_plan(fake_cuda, on_cuda):
    from spinctl.scoring.common import CUDA_TOKENS, MAX_BATCH
    from spinctl.scoring.engine import _plan
    from spinctl.scoring.targets import select_targets

    path, loaded, _ = on_cuda
    targets = select_targets(loaded.model, "mlp", path)
    data = samples(300, 120, 40)
    roomy = _plan(AUTO, loaded, targets, data)
    assert roomy == (MAX_BATCH, CUDA_TOKENS)  # a tiny model on a large device: the caps rule
    fake_cuda["free"] = 4 << 20
    tight = _plan(AUTO, loaded, targets, data)
    check_plan(tight, 300)
    assert tight[0] < roomy[0] and tight[1] < roomy[1]
    fake_cuda.update(free=80 * GiB, fraction=(4 << 20) / fake_cuda["total"])  # the process's share caps it alike
    assert _plan(AUTO, loaded, targets, data) == tight
    fake_cuda.update(free=4 << 20, fraction=1.0, reserved=1 * GiB)  # memory the allocator caches unused is free too
    assert _plan(AUTO, loaded, targets, data) == roomy
    fake_cuda.update(free=0, reserved=0)
    assert _plan(AUTO, loaded, targets, data) == (1, 300)  # never below one sample, its own tokens
    assert _plan(SimpleNamespace(batch_size=3), loaded, targets, data) == (3, None)


def test_stream_plan_obeys_the_process_fraction(fake_cuda, on_cuda):
    from spinctl.scoring.common import CUDA_TOKENS, MAX_BATCH
    from spinctl.scoring.layerwise import HEAD_BYTES, plan_batches
    from spinctl.scoring.targets import select_targets

    path, _, sk = on_cuda
    targets = select_targets(sk.model, "all", path)
    data = samples(200, 50)
    assert plan_batches(AUTO, sk, targets, data) == (MAX_BATCH, CUDA_TOKENS)
    # set_per_process_memory_fraction caps what this process may take, however much is free
    fake_cuda["fraction"] = (HEAD_BYTES + (64 << 20)) / fake_cuda["total"]
    capped = plan_batches(AUTO, sk, targets, data)
    check_plan(capped, 200)
    assert capped[0] < MAX_BATCH and capped[1] < CUDA_TOKENS
    fake_cuda["allocated"] = 4 << 20  # what the process holds already comes off its share
    smaller = plan_batches(AUTO, sk, targets, data)
    check_plan(smaller, 200)
    assert smaller[0] <= capped[0] and smaller[1] < capped[1]
    fake_cuda["fraction"] = 0.0
    assert plan_batches(AUTO, sk, targets, data) == (1, 200)
    assert plan_batches(SimpleNamespace(batch_size=5), sk, targets, data) == (5, None)


def test_stream_plan_without_the_fraction_query(fake_cuda, on_cuda, monkeypatch):
    """torch before 2.6 has no get_per_process_memory_fraction: the plan takes the whole device."""
    import torch

    from spinctl.scoring.common import CUDA_TOKENS, MAX_BATCH
    from spinctl.scoring.layerwise import plan_batches
    from spinctl.scoring.targets import select_targets

    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction", raising=False)
    path, _, sk = on_cuda
    assert plan_batches(AUTO, sk, select_targets(sk.model, "mlp", path), samples(30)) == (MAX_BATCH, CUDA_TOKENS)


def test_max_memory_caps_the_cuda_plans(fake_cuda, on_cuda):
    from spinctl.scoring.engine import _plan
    from spinctl.scoring.layerwise import plan_batches
    from spinctl.scoring.targets import select_targets

    path, loaded, sk = on_cuda
    targets = select_targets(loaded.model, "mlp", path)
    data = samples(300, 120, 40)
    roomy = _plan(AUTO, loaded, targets, data)
    fake_cuda["allocated"] = 1 << 20
    capped = _plan(auto(max_memory=(1 << 20) + (4 << 20)), loaded, targets, data)  # 4 MiB beyond what is held
    check_plan(capped, 300)
    assert capped[1] < roomy[1]
    assert _plan(auto(max_memory=1 << 20), loaded, targets, data) == (1, 300)  # nothing left: one sample
    assert plan_batches(auto(max_memory=1 << 20), sk, targets, data) == (1, 300)


def test_wanda_plans_without_the_snip_memory_model(fake_cuda, on_cuda):
    """wanda keeps no activations and forms no per-sample gradients: where snip's batches
    shrink, its own stay larger."""
    from spinctl.scoring.common import CUDA_TOKENS
    from spinctl.scoring.engine import _plan
    from spinctl.scoring.targets import select_targets

    path, loaded, _ = on_cuda
    targets = select_targets(loaded.model, "mlp", path)
    data = samples(300, 120, 40)
    fake_cuda["free"] = 8 << 20
    snip = _plan(AUTO, loaded, targets, data)
    wanda = _plan(auto("wanda"), loaded, targets, data)
    assert snip[1] < CUDA_TOKENS and wanda[1] == CUDA_TOKENS and wanda[0] > snip[0]


def test_cpu_plan_keeps_rss_under_the_budget(tiny_model, monkeypatch):
    """On CPU the room is the budget (--max-memory, else half of host memory) less this
    process's resident memory; the throughput cap rules when there is plenty."""
    from spinctl.runtime import load_model
    from spinctl.scoring import common
    from spinctl.scoring.common import CPU_TOKENS, MAX_BATCH
    from spinctl.scoring.engine import _plan
    from spinctl.scoring.targets import select_targets

    path = tiny_model()
    loaded = load_model(path, "cpu", "float32")
    targets = select_targets(loaded.model, "mlp", path)
    data = samples(300, 120, 40)
    monkeypatch.setattr(common, "rss_bytes", lambda: 1 * GiB)
    monkeypatch.setattr(common, "host_memory_bytes", lambda: 64 * GiB)
    assert _plan(AUTO, loaded, targets, data) == (MAX_BATCH, CPU_TOKENS)
    assert common.plan_room(None, loaded.device) == (32 * GiB, 31 * GiB)
    tight = _plan(auto(max_memory=GiB + (3 << 20)), loaded, targets, data)  # 3 MiB of room
    assert 1 <= tight[0] < MAX_BATCH and 300 <= tight[1] < CPU_TOKENS
    assert _plan(auto(max_memory=GiB // 2), loaded, targets, data) == (1, 300)  # over budget already: one sample


def test_auto_dtype_checks_bf16_support(monkeypatch):
    """auto takes bf16 only where the GPU has it natively (compute capability 8.0+), else
    fp16 (snip scales its loss); asking for bf16 there is a one-line error."""
    import torch

    from spinctl.errors import UnsupportedError
    from spinctl.runtime import resolve_dtype

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", cuda) is torch.float16
    assert resolve_dtype("float32", cuda) is torch.float32
    with pytest.raises(UnsupportedError, match="no native bfloat16; use --dtype float16 or float32"):
        resolve_dtype("bfloat16", cuda)
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
