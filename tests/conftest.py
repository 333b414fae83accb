"""Shared fixtures: tiny random models of real architectures, built once per session in tmp.

Running the CLI is not a fixture: `from clirun import cli` (tests/clirun.py says why).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def pytest_configure(config):
    # Without usable compiled kernels (a checkout never built, or a kernel edited since: `make
    # install` builds them) every spinctl run would print the fallback notice, and the tests that
    # count stderr lines would count it too: run the JIT on purpose instead, and say so.
    from spinctl_kernels import native

    module, why = native.probe()
    if module is None and why is not None:
        os.environ[native.ENV] = "jit"
        config.stash[KERNELS] = f"numba JIT (compiled kernels {why})"
    else:
        config.stash[KERNELS] = "numba JIT (SPINCTL_KERNELS=jit)" if module is None else "compiled ahead of time"


def pytest_report_header(config):
    return f"spinctl kernels: {config.stash[KERNELS]}"


KERNELS = pytest.StashKey[str]()

TEXTS = [
    f"{a} {b} the {c} near {d}, and {e} asked about it number {i}."
    for i, (a, b, c, d, e) in enumerate(
        (a, b, c, d, e)
        for a in ("Alice", "Bob", "Carol", "Dan")
        for b in ("found", "moved", "painted", "sold")
        for c in ("red box", "old car", "small boat")
        for d in ("the river", "a school", "my house")
        for e in ("she", "he", "they")
    )
][:300]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(arch="llama", dtype="float32", shard=None, **kw) -> read-only model dir.

    Built once per distinct argument set; tests that modify a model must copy it first
    (use `model_copy`).
    """
    from spinctl.demo.tiny_models import build_tiny_model

    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", dtype: str = "float32", shard: str | None = None, **kw) -> Path:
        key = (arch, dtype, shard, tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{dtype}-{shard or 'single'}")
            cache[key] = build_tiny_model(out / "model", TEXTS, arch=arch, dtype=dtype, max_shard_size=shard, **kw)
        return cache[key]

    return make


@pytest.fixture
def model_copy(tmp_path):
    """copy(src) -> a private copy of a model directory (or file) under tmp_path."""

    def copy(src: Path) -> Path:
        dst = tmp_path / ("copy-" + src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    return copy


@pytest.fixture(scope="session")
def bench_data(tmp_path_factory) -> Path:
    """CSVs for the benchmarks' smoke tests made from the builtin sets (always there, unlike
    ../shared/data): pass `--data DIR/fairness.csv --data-dir DIR`."""
    import csv
    import json
    from importlib.resources import files

    out = tmp_path_factory.mktemp("bench-data")
    for name in ("general", "privacy", "fairness"):
        rows = [json.loads(line) for line in (files("spinctl.builtin") / f"{name}.jsonl").read_text().splitlines()]
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "response"])
            writer.writeheader()
            writer.writerows({"prompt": r["prompt"], "response": r["response"]} for r in rows)
    return out
