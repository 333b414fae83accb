"""--stream's read-ahead (spinctl/scoring/prefetch.py): the next layer's weights and the next
batch's spilled activations are read on the worker thread, the files are the same bytes as
with it off, and a failed read ahead is the same one-line error as a failed read in place."""

from __future__ import annotations

import threading

import pytest
from test_score import data_csv, run  # noqa: F401 (data_csv is a fixture)
from test_stream import sharded

from spinctl.errors import InputError
from spinctl.scoring.prefetch import Prefetcher, enabled


@pytest.fixture(autouse=True)
def prefetch_on(monkeypatch):
    """On by default on CUDA only (prefetch.py says why); these tests run it on the CPU."""
    monkeypatch.setenv("SPINCTL_PREFETCH", "1")


def test_on_by_default_on_cuda_only(monkeypatch):
    import torch

    monkeypatch.delenv("SPINCTL_PREFETCH")
    assert enabled(torch.device("cuda", 0)) and not enabled(torch.device("cpu"))
    for env, want in (("0", False), ("1", True)):
        monkeypatch.setenv("SPINCTL_PREFETCH", env)
        assert enabled(torch.device("cuda", 0)) is want and enabled(torch.device("cpu")) is want


def cpu():
    import torch

    return torch.device("cpu")


def test_take_returns_what_ran_ahead_on_the_worker():
    with Prefetcher(cpu()) as pf:
        pf.ahead("a", lambda: threading.current_thread().name)
        assert pf.take("a", lambda: "in place").startswith("spinctl-prefetch")
        assert pf.take("a", lambda: "in place") == "in place"  # taken once; nothing pending now
        assert pf.take("b", threading.current_thread) is threading.current_thread()


def test_failure_ahead_is_raised_at_take_and_dropped_if_never_taken():
    def fail():
        raise InputError("shard.safetensors: tensor w: file ends 4 bytes early; the shard is truncated")

    with Prefetcher(cpu()) as pf:
        pf.ahead("a", fail)
        with pytest.raises(InputError, match="truncated"):
            pf.take("a", lambda: None)
        pf.ahead("b", fail)  # never taken: close() waits for it and drops the error
    assert pf.pending == {}


def test_off_runs_everything_in_place(monkeypatch):
    monkeypatch.setenv("SPINCTL_PREFETCH", "0")
    with Prefetcher(cpu()) as pf:
        pf.ahead("a", lambda: threading.current_thread().name)
        assert pf.pending == {} and pf.take("a", lambda: "in place") == "in place"


@pytest.mark.parametrize("method", ["snip", "wanda"])
def test_sweeps_read_ahead_and_write_the_same_bytes(tiny_model, data_csv, tmp_path, monkeypatch, method):
    from spinctl.scoring.layerwise_model import Skeleton
    from spinctl.scoring.layerwise_store import Boundaries

    model = sharded(tiny_model, "llama")
    spill = tmp_path / "spill"
    spill.mkdir()
    where: list[tuple[str, object]] = []
    real_fetch, real_get = Skeleton.fetch, Boundaries.get

    def fetch(self, part):
        where.append((threading.current_thread().name, ("part", part)))
        return real_fetch(self, part)

    def get(self, slot, batch):
        where.append((threading.current_thread().name, ("slot", slot, batch)))
        return real_get(self, slot, batch)

    monkeypatch.setattr(Skeleton, "fetch", fetch)
    monkeypatch.setattr(Boundaries, "get", get)
    files = {}
    for on in ("0", "1"):
        monkeypatch.setenv("SPINCTL_PREFETCH", on)
        where.clear()
        files[on] = tmp_path / f"prefetch-{on}.safetensors"
        run(model, data_csv, files[on], method=method, stream=True, spill_dir=spill, batch_size=2)
        on_worker = {what for who, what in where if who.startswith("spinctl-prefetch")}
        if on == "0":
            assert on_worker == set()
            continue
        # all 3 layers (targets "all": wanda scores the top one too), layer 0 during the embeddings
        assert {("part", layer) for layer in range(3)} <= on_worker
        # 8 samples in batches of 2: every batch but the first of each slot is read ahead
        assert ("slot", 0, 1) in on_worker and ("slot", 0, 0) not in on_worker
        if method == "snip":
            assert ("part", "head") in on_worker and ("slot", 3, 3) in on_worker
    assert files["0"].read_bytes() == files["1"].read_bytes()
    assert list(spill.iterdir()) == []


def test_a_failed_read_ahead_is_a_one_line_error(tiny_model, data_csv, tmp_path, monkeypatch):
    import spinctl.scoring.layerwise_model as lm

    model = sharded(tiny_model, "llama")
    real = lm.read_tensor

    def read_tensor(entry, device, dtype):
        if ".layers.2." in entry.name:
            assert threading.current_thread().name.startswith("spinctl-prefetch")
            raise InputError(f"{entry.file}: tensor {entry.name}: file ends 4 bytes early; the shard is truncated")
        return real(entry, device, dtype)

    monkeypatch.setattr(lm, "read_tensor", read_tensor)
    out = tmp_path / "s.safetensors"
    with pytest.raises(InputError, match=r"layers\.2\..*truncated"):
        run(model, data_csv, out, stream=True)
    assert not out.exists()
