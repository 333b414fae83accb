"""Crash recovery (docs/design.md §6, §8): a patch or revert that dies part-way is finished or undone by rerunning.

In process, `os.pwrite` (the only call that writes ranges in place) raises after N calls;
in a child process it calls `os._exit(9)` instead, so nothing gets to clean up.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from clirun import cli, python, start
from fakes import fake_scores

import spinctl.io.edits
import spinctl.patch
from spinctl.errors import InputError
from spinctl.io.checkpoint import open_checkpoint
from spinctl.io.formats import read_selection, write_selection
from spinctl.io.sidecars import read_manifest, sidecar_paths
from spinctl.patch import PatchConfig, patch, plan
from spinctl.selection import SelectConfig, run_select
from spinctl.verify import revert, verify

MODELS = ["sharded-bf16", "single-f32"]


class Crash(Exception):
    """Stands for the process dying: nothing catches it on the way out."""


# ---- inputs ------------------------------------------------------------------------------


class Pristine:
    """A model (its weights read-only), a selection for it and its out-of-place patch: the expected bytes."""

    def __init__(self, target: Path, base: Path):
        self.target = target  # a model directory, or a .safetensors file
        r = fake_scores(self._dir, base / "r.safetensors", 0, keep=0.05)
        c = fake_scores(self._dir, base / "c.safetensors", 1, keep=0.05)
        indices, meta = run_select(SelectConfig(r, (c,), 0.01, 0.03))
        self.sel_path = base / "sel.safetensors"
        write_selection(self.sel_path, indices, meta)
        self.sel = read_selection(self.sel_path)
        self.ref = base / "ref"
        self.ref_manifest = patch(PatchConfig(target, self.ref), self.sel)
        plans = plan(open_checkpoint(target), self.sel)
        self.ranges = sum(len(p.edits.starts) for p in plans)  # pwrite calls of one in-place patch
        assert self.ranges > 20 and sum(1 for p in plans if p.edits) >= (2 if target.is_dir() else 1)

    @property
    def _dir(self) -> Path:
        return self.target if self.target.is_dir() else self.target.parent

    def copy(self, tmp: Path) -> Path:
        """A private copy; returns its target (directory or file)."""
        d = Path(shutil.copytree(self._dir, tmp / "model"))
        return d if self.target.is_dir() else d / self.target.name


@pytest.fixture(scope="module", params=MODELS)
def pristine(request, tiny_model, tmp_path_factory) -> Pristine:
    base = tmp_path_factory.mktemp(f"crash-{request.param}")
    if request.param == "sharded-bf16":
        return Pristine(tiny_model("llama", "bfloat16", shard="40KB"), base)
    return Pristine(tiny_model("llama", "float32") / "model.safetensors", base)


# ---- looking at bytes ----------------------------------------------------------------------


def root_of(target: Path) -> Path:
    return target if target.is_dir() else target.parent


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root, hidden ones included."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def weight_names(pr: Pristine) -> list[str]:
    return [s.path.name for s in open_checkpoint(pr.target).shards]


def assert_equals_out_of_place(pr: Pristine, target: Path) -> None:
    """Every weight file and the undo log byte-identical to the out-of-place patch; same manifest figures."""
    root = root_of(target)
    for name in weight_names(pr):
        assert (root / name).read_bytes() == (pr.ref / name).read_bytes(), name
    manifest_path, undo_path = sidecar_paths(target)
    assert undo_path.read_bytes() == (pr.ref / "spin-undo.safetensors").read_bytes()
    m = read_manifest(manifest_path)
    for key in ("files", "tensors", "totals", "fingerprint"):
        assert m[key] == pr.ref_manifest[key], key
    result = verify(target)
    assert result["ok"] and result["hashes_checked"], result


def arm_pwrite(monkeypatch, n: int) -> None:
    """From now on the (n+1)-th os.pwrite raises Crash (monkeypatch.undo() disarms it)."""
    real, calls = os.pwrite, [0]

    def pwrite(fd, data, offset):
        if calls[0] >= n:
            raise Crash(f"died after {n} range writes")
        calls[0] += 1
        return real(fd, data, offset)

    monkeypatch.setattr(spinctl.io.edits.os, "pwrite", pwrite)


def die(*args, **kwargs):
    raise Crash("died")


def crash_patch(pr: Pristine, target: Path, point: str, monkeypatch) -> None:
    """Run an in-place patch that dies at `point`: after 0, half or all but one range writes, or before the manifest."""
    if point == "manifest":
        monkeypatch.setattr(spinctl.patch, "write_manifest", die)
    else:
        arm_pwrite(monkeypatch, {"first": 0, "middle": pr.ranges // 2, "last": pr.ranges - 1}[point])
    with pytest.raises(Crash):
        patch(PatchConfig(target, in_place=True), pr.sel)
    monkeypatch.undo()


def assert_partly_written(pr: Pristine, target: Path, point: str, before: dict[str, str]) -> None:
    """The state a crash mid-patch leaves: undo log written, no manifest, the ranges written up to `point`."""
    manifest_path, undo_path = sidecar_paths(target)
    assert undo_path.exists() and not manifest_path.exists()
    with pytest.raises(InputError):
        verify(target)  # a clean refusal: there is nothing to verify against yet
    now, done = tree(root_of(target)), tree(pr.ref)
    assert not [k for k in now if k.endswith(".tmp")]
    names = weight_names(pr)
    weights, done, untouched = ({n: t[n] for n in names} for t in (now, done, before))
    if point == "first":
        assert weights == untouched
    elif point == "manifest":
        assert weights == done
    else:  # torn: some ranges zeroed, not all
        assert weights != untouched and weights != done


POINTS = ["first", "middle", "last", "manifest"]


# ---- in place: crash in patch --------------------------------------------------------------


@pytest.mark.parametrize("point", POINTS)
def test_patch_crash_then_rerun_patch(pristine, tmp_path, point, monkeypatch):
    target = pristine.copy(tmp_path)
    before = tree(root_of(target))
    crash_patch(pristine, target, point, monkeypatch)
    assert_partly_written(pristine, target, point, before)
    patch(PatchConfig(target, in_place=True), pristine.sel)
    assert_equals_out_of_place(pristine, target)


@pytest.mark.parametrize("point", POINTS)
def test_patch_crash_then_revert(pristine, tmp_path, point, monkeypatch):
    target = pristine.copy(tmp_path)
    before = tree(root_of(target))
    crash_patch(pristine, target, point, monkeypatch)
    revert(target)
    assert tree(root_of(target)) == before  # pristine bytes, no spin-* files


# ---- in place: crash in revert -------------------------------------------------------------


def crash_revert(target: Path, point: str, ranges: int, monkeypatch) -> None:
    if point == "unlink":  # bytes restored, manifest removed, the undo log not yet
        real = pathlib.Path.unlink

        def unlink(self, *a, **k):
            if self.name.endswith("spin-undo.safetensors"):
                raise Crash("died before removing the undo log")
            return real(self, *a, **k)

        monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    else:
        arm_pwrite(monkeypatch, {"first": 0, "middle": ranges // 2, "last": ranges - 1}[point])
    with pytest.raises(Crash):
        revert(target)
    monkeypatch.undo()


@pytest.mark.parametrize("first_patch", ["complete", "crashed"])
@pytest.mark.parametrize("point", ["first", "middle", "last", "unlink"])
def test_revert_crash_then_rerun_revert(pristine, tmp_path, point, first_patch, monkeypatch):
    target = pristine.copy(tmp_path)
    before = tree(root_of(target))
    if first_patch == "complete":
        patch(PatchConfig(target, in_place=True), pristine.sel)
    else:
        crash_patch(pristine, target, "middle", monkeypatch)
    crash_revert(target, point, pristine.ranges, monkeypatch)
    assert sidecar_paths(target)[1].exists()  # the undo log outlives any crash of revert
    revert(target)
    assert tree(root_of(target)) == before


# ---- out of place: a crash leaves nothing ----------------------------------------------------


def _die_after(n: int, what: str):
    calls = [0]

    def tick():
        if calls[0] >= n:
            raise Crash(f"died in {what} after {n} calls") if what != "interrupt" else KeyboardInterrupt()
        calls[0] += 1

    return tick


@pytest.mark.parametrize("how", ["stream-midway", "interrupt", "no-hash-pwrite", "before-manifest"])
def test_out_of_place_crash_leaves_nothing(pristine, tmp_path, monkeypatch, how):
    src = pristine.copy(tmp_path)
    (tmp_path / "outs").mkdir()
    out = tmp_path / "outs" / "patched"
    before = tree(tmp_path)
    no_hash = how == "no-hash-pwrite"
    if how in ("stream-midway", "interrupt"):
        monkeypatch.setattr(spinctl.io.edits, "CHUNK", 4096)  # several chunks per shard: die inside one
        tick, real = _die_after(5, "interrupt" if how == "interrupt" else "stream"), spinctl.io.edits._write_full

        def write_full(f, data):
            tick()
            return real(f, data)

        monkeypatch.setattr(spinctl.io.edits, "_write_full", write_full)
    elif how == "no-hash-pwrite":
        tick, real = _die_after(3, "pwrite"), os.pwrite

        def pwrite(fd, data, offset):
            tick()
            return real(fd, data, offset)

        monkeypatch.setattr(spinctl.io.edits.os, "pwrite", pwrite)
    else:
        monkeypatch.setattr(spinctl.patch, "write_manifest", die)
    with pytest.raises(KeyboardInterrupt if how == "interrupt" else Crash):
        patch(PatchConfig(src, out, no_hash=no_hash), pristine.sel)
    monkeypatch.undo()
    assert tree(tmp_path) == before  # no OUT, no .patched.*.tmp, input untouched
    assert os.listdir(tmp_path / "outs") == []
    patch(PatchConfig(src, out, no_hash=no_hash), pristine.sel)  # and nothing blocks a rerun
    for name in weight_names(pristine):
        assert (out / name).read_bytes() == (pristine.ref / name).read_bytes(), name


def test_out_of_place_revert_crash_leaves_nothing(pristine, tmp_path, monkeypatch):
    patched = tmp_path / "patched"
    shutil.copytree(pristine.ref, patched)
    target = patched  # out of place, even a single-file IN gives a directory with spin-* files
    before = tree(tmp_path)
    monkeypatch.setattr(spinctl.io.edits, "CHUNK", 4096)
    tick, real = _die_after(4, "stream"), spinctl.io.edits._write_full

    def write_full(f, data):
        tick()
        return real(f, data)

    monkeypatch.setattr(spinctl.io.edits, "_write_full", write_full)
    with pytest.raises(Crash):
        revert(target, tmp_path / "restored")
    assert tree(tmp_path) == before


# ---- a real kill: os._exit in a child process, then the CLI reruns ------------------------

KILLER = r"""
import os, sys
import spinctl.io.edits as st

what, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def tick():
    if calls[0] >= n:
        os._exit(9)  # no finally, no cleanup: as good as SIGKILL
    calls[0] += 1

if what == "pwrite":
    real_pwrite = os.pwrite
    def pwrite(fd, data, offset):
        tick()
        return real_pwrite(fd, data, offset)
    os.pwrite = pwrite
else:  # die inside the streaming copy
    st.CHUNK = 4096
    real_write = st._write_full
    def write_full(f, data):
        tick()
        return real_write(f, data)
    st._write_full = write_full

sys.argv = ["spinctl", *sys.argv[3:]]
from spinctl.cli import main
main()
"""


def killed(what: str, n: int, *args) -> subprocess.CompletedProcess:
    return python("-c", KILLER, what, n, *args)


@pytest.fixture(scope="module")
def sharded(tiny_model, tmp_path_factory) -> Pristine:
    return Pristine(tiny_model("llama", "bfloat16", shard="40KB"), tmp_path_factory.mktemp("crash-kill"))


def test_killed_in_place_patch_and_revert_recover(sharded, tmp_path):
    pr = sharded
    m = pr.copy(tmp_path)
    before = tree(m)

    r = killed("pwrite", pr.ranges // 2, "patch", m, "--in-place", "-s", pr.sel_path, "--quiet")
    assert r.returncode == 9, r.stdout + r.stderr
    assert_partly_written(pr, m, "middle", before)
    r = cli("patch", m, "--in-place", "-s", pr.sel_path, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert_equals_out_of_place(pr, m)
    assert cli("verify", m).returncode == 0

    r = killed("pwrite", pr.ranges // 3, "revert", m, "--in-place", "--quiet")
    assert r.returncode == 9, r.stdout + r.stderr
    assert tree(m) != before and (m / "spin-undo.safetensors").exists()
    r = cli("revert", m, "--in-place", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree(m) == before


def test_killed_out_of_place_patch_leaves_no_output(sharded, tmp_path):
    pr = sharded
    m = pr.copy(tmp_path)
    before = tree(m)
    out = tmp_path / "out"
    r = killed("stream", 12, "patch", m, out, "-s", pr.sel_path, "--quiet")
    assert r.returncode == 9, r.stdout + r.stderr
    assert not out.exists() and tree(m) == before
    # a killed process cannot clean up: only its hidden staging dir may remain, and it blocks nothing
    assert all(n.startswith(".out.") and n.endswith(".tmp") for n in os.listdir(tmp_path) if n not in ("model",))
    r = cli("patch", m, out, "-s", pr.sel_path, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in weight_names(pr):
        assert (out / name).read_bytes() == (pr.ref / name).read_bytes(), name
    assert cli("verify", out).returncode == 0


# ---- two processes racing: the interleaving forced with SPINCTL_TEST_PAUSE ------------------


class Paused:
    """A spinctl CLI process stopped at a named step (spinctl.io.testpoint) until `go()`."""

    def __init__(self, step: str, gate: Path, *args):
        gate.mkdir(exist_ok=True)
        self.step, self.gate = step, gate
        self.proc = start(*args, env={"SPINCTL_TEST_PAUSE": f"{step}:{gate}"})
        deadline = time.monotonic() + 60
        while not (gate / f"{step}.reached").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out, err = self.proc.communicate(timeout=60)
                raise AssertionError(f"never reached {step} (rc {self.proc.returncode}): {out}{err}")
            time.sleep(0.01)

    def go(self) -> subprocess.CompletedProcess:
        (self.gate / f"{self.step}.go").write_text("")
        out, err = self.proc.communicate(timeout=120)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def assert_locked_out(r: subprocess.CompletedProcess, target: Path) -> None:
    """Refused at once, in one line that names the model and says another spinctl holds it."""
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert str(target) in r.stderr and "another spinctl" in r.stderr, r.stderr


def assert_still_waiting(p: subprocess.Popen, seconds: float = 1.5) -> None:
    try:
        out, err = p.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        return
    raise AssertionError(f"--wait did not wait (rc {p.returncode}): {out}{err}")


def test_race_second_in_place_patch_is_refused(pristine, tmp_path):
    """The lost-bytes race: B checked there is no undo log, A patches meanwhile, B would log A's zeros."""
    target = pristine.copy(tmp_path)
    before = tree(root_of(target))
    b = Paused(
        "patch-reading-originals", tmp_path / "gate", "patch", target, "--in-place", "-s", pristine.sel_path, "-q"
    )
    assert_locked_out(cli("patch", target, "--in-place", "-s", pristine.sel_path, "-q"), target)
    r = b.go()
    assert r.returncode == 0, r.stderr
    assert_equals_out_of_place(pristine, target)
    assert cli("revert", target, "--in-place", "-q").returncode == 0
    assert tree(root_of(target)) == before


def test_race_second_in_place_patch_waits(sharded, tmp_path):
    """--wait blocks until the first patch is done, then meets a patched model and is refused as usual."""
    target = sharded.copy(tmp_path)
    before = tree(target)
    a = Paused("patch-undo-written", tmp_path / "gate", "patch", target, "--in-place", "-s", sharded.sel_path, "-q")
    b = start("patch", target, "--in-place", "-s", sharded.sel_path, "-q", "--wait")
    assert_still_waiting(b)
    assert a.go().returncode == 0
    out, err = b.communicate(timeout=120)
    assert b.returncode == 1 and "already patched" in err, err
    assert_equals_out_of_place(sharded, target)
    assert cli("revert", target, "--in-place", "-q").returncode == 0
    assert tree(target) == before


def test_race_revert_during_patch_is_refused(pristine, tmp_path):
    """Without a lock the revert deleted the undo log while the patch went on zeroing: the originals were gone."""
    target = pristine.copy(tmp_path)
    before = tree(root_of(target))
    a = Paused("patch-undo-written", tmp_path / "gate", "patch", target, "--in-place", "-s", pristine.sel_path, "-q")
    assert_locked_out(cli("revert", target, "--in-place", "-q"), target)
    assert a.go().returncode == 0
    assert_equals_out_of_place(pristine, target)
    assert cli("revert", target, "--in-place", "-q").returncode == 0
    assert tree(root_of(target)) == before


def test_race_revert_waits_for_patch(sharded, tmp_path):
    target = sharded.copy(tmp_path)
    before = tree(target)
    a = Paused("patch-undo-written", tmp_path / "gate", "patch", target, "--in-place", "-s", sharded.sel_path, "-q")
    b = start("revert", target, "--in-place", "-q", "--wait")
    assert_still_waiting(b)
    assert a.go().returncode == 0
    out, err = b.communicate(timeout=120)
    assert b.returncode == 0, err
    assert tree(target) == before


def test_race_patch_during_revert_is_refused(sharded, tmp_path):
    target = sharded.copy(tmp_path)
    before = tree(target)
    assert cli("patch", target, "--in-place", "-s", sharded.sel_path, "-q").returncode == 0
    a = Paused("revert-restoring", tmp_path / "gate", "revert", target, "--in-place", "-q")
    assert_locked_out(cli("patch", target, "--in-place", "-s", sharded.sel_path, "-q"), target)
    assert a.go().returncode == 0
    assert tree(target) == before


def test_race_reader_and_in_place_writer_exclude_each_other(sharded, tmp_path):
    """An out-of-place patch reads its input under a shared lock: no copy of half-zeroed shards, no zeroing under a copy."""
    target = sharded.copy(tmp_path)
    before = tree(target)
    a = Paused("patch-undo-written", tmp_path / "gate", "patch", target, "--in-place", "-s", sharded.sel_path, "-q")
    assert_locked_out(cli("patch", target, tmp_path / "out", "-s", sharded.sel_path, "-q"), target)
    assert not (tmp_path / "out").exists()
    assert a.go().returncode == 0
    assert cli("revert", target, "--in-place", "-q").returncode == 0
    assert tree(target) == before

    b = Paused("patch-copying", tmp_path / "gate2", "patch", target, tmp_path / "out", "-s", sharded.sel_path, "-q")
    assert_locked_out(cli("patch", target, "--in-place", "-s", sharded.sel_path, "-q"), target)
    assert b.go().returncode == 0
    assert tree(target) == before
    for name in weight_names(sharded):
        assert (tmp_path / "out" / name).read_bytes() == (sharded.ref / name).read_bytes(), name


def test_race_single_file_inside_directory_being_patched(sharded, tmp_path):
    """A shard reverted as a lone file while its directory is patched in place."""
    target = sharded.copy(tmp_path)
    before = tree(target)
    shard = next(p.shard.path for p in plan(open_checkpoint(target), sharded.sel) if p.edits)
    a = Paused("patch-undo-written", tmp_path / "gate", "patch", target, "--in-place", "-s", sharded.sel_path, "-q")
    assert_locked_out(cli("revert", shard, "--in-place", "-q"), target)  # the shard's revert is its directory's
    assert a.go().returncode == 0
    assert cli("revert", target, "--in-place", "-q").returncode == 0
    assert tree(target) == before


def test_stale_sidecar_temps_are_removed(pristine, tmp_path):
    """issue 11 item 15: a kill between writing and renaming the undo log or manifest leaves .NAME.*.tmp; the next run removes them."""
    target = pristine.copy(tmp_path)
    before = tree(root_of(target))
    manifest_path, undo_path = sidecar_paths(target)
    stale = [p.with_name(f".{p.name}.k1ll3d.tmp") for p in (manifest_path, undo_path)]
    for p in stale:
        p.write_bytes(b"half")
    patch(PatchConfig(target, in_place=True), pristine.sel)
    assert not any(p.exists() for p in stale)
    for p in stale:
        p.write_bytes(b"half")
    revert(target)
    assert tree(root_of(target)) == before
