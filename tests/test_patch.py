"""End to end on tiny random Llama/Qwen2 checkpoints: patch, verify, revert, in place vs out of place."""

import filecmp
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import cli
from fakes import fake_scores
from safetensors.torch import load_file

from spinctl.io.formats import read_selection
from spinctl.patch import PatchConfig, patch
from spinctl.selection import SelectConfig, select_to_file
from spinctl.verify import revert, verify

CASES = [
    ("llama", "bfloat16", "40KB"),
    ("llama", "float32", None),
    ("qwen2", "float32", "100KB"),
    ("qwen2", "bfloat16", None),
]


def make_selection(model: Path, tmp: Path, p=0.02, q=0.04, mode="paper") -> Path:
    files = [fake_scores(model, tmp / f"scores{i}.safetensors", seed=i, keep=0.05) for i in range(3)]
    select_to_file(SelectConfig(files[0], (files[1], files[2]), p, q, mode), tmp / "sel.safetensors")
    return tmp / "sel.safetensors"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a file or directory, as raw integers so comparisons are bitwise."""
    files = [path] if path.is_file() else sorted(path.glob("model*.safetensors"))
    out = {}
    for f in files:
        for n, t in load_file(f).items():
            out[n] = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return out


def check_patched(src: Path, dst: Path, sel_path: Path) -> None:
    """Only the selected elements differ, and they are +0.0 bytes; other files are byte-identical."""
    sel = read_selection(sel_path)
    a, b = tensors(src), tensors(dst)
    assert a.keys() == b.keys()
    for name in a:
        idx = torch.from_numpy(sel.indices.get(name, np.zeros(0, np.int64)))
        fa, fb = a[name].flatten().clone(), b[name].flatten()
        assert (fb[idx] == 0).all(), name
        fa[idx] = 0
        assert torch.equal(fa, fb), name
    changed = {
        f.name
        for f in (src.glob("*.safetensors") if src.is_dir() else [src])
        if any(n in sel.indices and len(sel.indices[n]) for n in load_file(f))
    }
    if src.is_dir():
        for f in src.iterdir():
            if f.name not in changed:
                assert filecmp.cmp(f, dst / f.name, shallow=False), f.name


@pytest.mark.parametrize("arch,dtype,shard", CASES)
def test_patch_verify_revert_roundtrip(tiny_model, tmp_path, arch, dtype, shard):
    src = tiny_model(arch, dtype, shard)
    sel = make_selection(src, tmp_path)
    out = tmp_path / "out"
    m = patch(PatchConfig(src, out), read_selection(sel))
    assert m["totals"]["zeroed"] == sum(len(a) for a in read_selection(sel).indices.values()) > 0
    check_patched(src, out, sel)
    assert (out / "spin-manifest.json").is_file() and (out / "spin-undo.safetensors").is_file()
    assert verify(out)["ok"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=getattr(torch, dtype))
    params = dict(model.named_parameters())
    for name, idx in read_selection(sel).indices.items():
        assert (params[name].detach().flatten()[torch.from_numpy(idx)] == 0).all()

    back = tmp_path / "back"
    revert(out, back)
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in src.iterdir())
    for f in src.iterdir():
        assert filecmp.cmp(f, back / f.name, shallow=False), f.name


@pytest.mark.parametrize("arch,dtype,shard", CASES[:3])
def test_in_place_equals_out_of_place(tiny_model, model_copy, tmp_path, arch, dtype, shard):
    src = tiny_model(arch, dtype, shard)
    sel = make_selection(src, tmp_path)
    out = tmp_path / "out"
    patch(PatchConfig(src, out), read_selection(sel))
    work = model_copy(src)
    patch(PatchConfig(work, in_place=True), read_selection(sel))
    for f in out.iterdir():
        if f.suffix == ".json" and f.name == "spin-manifest.json":
            a, b = json.loads(f.read_text()), json.loads((work / f.name).read_text())
            assert a["files"] == b["files"] and a["tensors"] == b["tensors"]
        else:
            assert filecmp.cmp(f, work / f.name, shallow=False), f.name
    assert verify(work)["ok"]
    revert(work)
    assert not list(work.glob("spin-*"))
    for f in src.iterdir():
        assert filecmp.cmp(f, work / f.name, shallow=False), f.name


def test_single_file_in(tiny_model, model_copy, tmp_path):
    src_dir = tiny_model("llama", "float32")
    sel = make_selection(src_dir, tmp_path)
    src = src_dir / "model.safetensors"
    out = tmp_path / "out"
    r = json.loads(cli("patch", src, out, "--selection", sel, "--json", check=True).stdout)
    assert r["output"] == str(out) and (out / "model.safetensors").is_file()
    check_patched(src, out / "model.safetensors", sel)
    assert cli("verify", out).returncode == 0

    work = model_copy(src)  # in place on a lone file: sidecars go beside it as NAME.spin-*
    cli("patch", work, "--in-place", "--selection", sel, check=True)
    assert (work.parent / f"{work.name}.spin-manifest.json").is_file()
    assert filecmp.cmp(work, out / "model.safetensors", shallow=False)
    assert cli("verify", work).returncode == 0
    cli("revert", work, "--in-place", check=True)
    assert filecmp.cmp(work, src, shallow=False) and not list(work.parent.glob("*.spin-*"))


def test_dry_run_writes_nothing(tiny_model, tmp_path):
    src = tiny_model("llama", "bfloat16", "40KB")
    sel = make_selection(src, tmp_path)
    r = json.loads(cli("patch", src, tmp_path / "out", "--selection", sel, "--dry-run", "--json", check=True).stdout)
    assert r["dry_run"] and r["totals"]["zeroed"] > 0 and not (tmp_path / "out").exists()


def test_link_and_no_hash(tiny_model, tmp_path):
    src = tiny_model("llama", "bfloat16", "40KB")
    sel = make_selection(src, tmp_path)
    out = tmp_path / "out"
    cli("patch", src, out, "--selection", sel, "--link", "--no-hash", check=True)
    m = json.loads((out / "spin-manifest.json").read_text())
    unchanged = [f for f, e in m["files"].items() if not e["changed"]]
    assert unchanged and all(os.path.samefile(src / f, out / f) for f in unchanged)
    assert not any("input_sha256" in e for e in m["files"].values())
    check_patched(src, out, sel)
    r = json.loads(cli("verify", out, "--json", check=True).stdout)
    assert r["ok"] and not r["hashes_checked"]


def test_patch_from_score_files_equals_selection(tiny_model, tmp_path):
    src = tiny_model("qwen2", "float32", "100KB")
    sel = make_selection(src, tmp_path, mode="reference")
    a, b = tmp_path / "a", tmp_path / "b"
    cli("patch", src, a, "--selection", sel, check=True)
    cli(
        "patch",
        src,
        b,
        "--retain",
        tmp_path / "scores0.safetensors",
        "--couple",
        tmp_path / "scores1.safetensors",
        "--couple",
        tmp_path / "scores2.safetensors",
        "--p",
        "0.02",
        "--q",
        "0.04",
        "--mode",
        "reference",
        check=True,
    )
    for f in a.glob("*.safetensors"):
        assert filecmp.cmp(f, b / f.name, shallow=False)


def test_verify_detects_tampering(tiny_model, tmp_path):
    src = tiny_model("llama", "float32", "100KB")
    out = tmp_path / "out"
    patch(PatchConfig(src, out), read_selection(make_selection(src, tmp_path)))
    m = json.loads((out / "spin-manifest.json").read_text())
    victim = next(f for f, e in m["files"].items() if e["changed"])
    data = bytearray((out / victim).read_bytes())
    data[-1] ^= 0xFF
    (out / victim).write_bytes(bytes(data))
    r = cli("verify", out, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["hash_mismatches"] == [victim]


def test_deterministic_outputs(tiny_model, tmp_path):
    src = tiny_model("llama", "bfloat16", "40KB")
    sel = make_selection(src, tmp_path)
    select_to_file(
        SelectConfig(tmp_path / "scores0.safetensors", (tmp_path / "scores1.safetensors",), 0.02, 0.04),
        tmp_path / "sel2.safetensors",
    )
    select_to_file(
        SelectConfig(tmp_path / "scores0.safetensors", (tmp_path / "scores1.safetensors",), 0.02, 0.04),
        tmp_path / "sel3.safetensors",
    )
    assert filecmp.cmp(tmp_path / "sel2.safetensors", tmp_path / "sel3.safetensors", shallow=False)
    patch(PatchConfig(src, tmp_path / "o1"), read_selection(sel))
    patch(PatchConfig(src, tmp_path / "o2"), read_selection(sel))
    for f in (tmp_path / "o1").iterdir():
        assert filecmp.cmp(f, tmp_path / "o2" / f.name, shallow=False), f.name


def attn_selection(model: Path, tmp: Path) -> Path:
    """A selection on the attention weights: with --link, their shards were shared with the input."""
    from spinctl.io.checkpoint import open_checkpoint

    names = sorted(n for n in open_checkpoint(model).tensors if "self_attn" in n and n.endswith("proj.weight"))
    r = fake_scores(model, tmp / "ar.safetensors", 7, keep=0.05, names=names)
    c = fake_scores(model, tmp / "ac.safetensors", 8, keep=0.05, names=names)
    select_to_file(SelectConfig(r, (c,), 0.01, 0.04), tmp / "asel.safetensors")
    return tmp / "asel.safetensors"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_in_place_refuses_hard_links(tiny_model, tmp_path):
    """issue 11 item 3: `patch m out --link` then an in-place write to either must not change the other."""
    import shutil

    src = tiny_model("llama", "bfloat16", "40KB")
    m, out = Path(shutil.copytree(src, tmp_path / "m")), tmp_path / "out"
    cli("patch", m, out, "--selection", make_selection(src, tmp_path), "--link", "-q", check=True)
    cli(
        "revert", out, "--in-place", "-q", check=True
    )  # out is the original again, its untouched shards still m's inodes
    asel = attn_selection(src, tmp_path)
    touched = {
        f
        for f, e in json.loads(cli("patch", m, "--in-place", "-s", asel, "--dry-run", "--json", check=True).stdout)[
            "files"
        ].items()
        if e["changed"]
    }
    assert any(os.stat(out / f).st_nlink > 1 for f in touched)
    before_m, before_out = snapshot(m), snapshot(out)
    for target in (out, m):
        r = cli("patch", target, "--in-place", "-s", asel)
        assert r.returncode == 1 and "hard link" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert str(target) in r.stderr and " && mv " in r.stderr, r.stderr
    assert snapshot(m) == before_m and snapshot(out) == before_out


def test_revert_in_place_refuses_hard_links(tiny_model, tmp_path):
    import shutil

    src = tiny_model("llama", "bfloat16", "40KB")
    m = Path(shutil.copytree(src, tmp_path / "m"))
    cli("patch", m, "--in-place", "-s", make_selection(src, tmp_path), "-q", check=True)
    twin = tmp_path / "twin"  # `cp -al m twin`: every file a second name of m's
    twin.mkdir()
    for f in m.iterdir():
        os.link(f, twin / f.name)
    before = snapshot(m)
    r = cli("revert", twin, "--in-place")
    assert r.returncode == 1 and "hard link" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert snapshot(m) == before and snapshot(twin) == before


def test_links_inside_the_model_are_copied_as_files(tiny_model, tmp_path):
    """issue 11 item 8: a symlinked file or subdirectory inside the model, or into a Hugging Face blob store, is copied."""
    import shutil

    src = tiny_model("llama", "float32")
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(src, snap)
    (repo / "blobs").mkdir()
    shutil.move(snap / "config.json", repo / "blobs" / "c0ffee")
    (snap / "config.json").symlink_to("../../blobs/c0ffee")  # how the HF cache lays out a snapshot
    (snap / "templates").mkdir()
    (snap / "templates" / "chat.jinja").write_text("{{ messages }}")
    (snap / "templates_alias").symlink_to("templates")
    (snap / "tokenizer_alias.json").symlink_to("tokenizer.json")
    out = tmp_path / "out"
    cli("patch", snap, out, "--selection", make_selection(src, tmp_path), "-q", check=True)
    for rel in ("config.json", "tokenizer_alias.json", "templates/chat.jinja", "templates_alias/chat.jinja"):
        assert (out / rel).is_file() and not (out / rel).is_symlink(), rel
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "templates_alias" / "chat.jinja").read_text() == "{{ messages }}"


def test_outputs_honour_umask(tiny_model, tmp_path):
    """issue 11 item 13: under umask 022 OUT is drwxr-xr-x and its files -rw-r--r--, undo log and manifest included."""
    import stat

    src = tiny_model("llama", "float32")
    sel = make_selection(src, tmp_path)
    old = os.umask(0o022)
    try:
        patch(PatchConfig(src, tmp_path / "out"), read_selection(sel))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_disk_full_names_the_output(tiny_model, tmp_path, monkeypatch):
    """issue 11 item 14: ENOSPC while writing OUT names OUT (not a temporary that is gone), and leaves nothing."""
    import errno

    from spinctl.errors import OutputError
    from spinctl.io import edits
    from spinctl.io.formats import write_selection

    src = tiny_model("llama", "float32")
    sel = read_selection(make_selection(src, tmp_path))

    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edits, "_write_full", full)
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / 'out'}: No space left on device"):
        patch(PatchConfig(src, tmp_path / "out"), sel)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")] and not (tmp_path / "out").exists()

    monkeypatch.setattr(Path, "write_bytes", lambda self, data: full(None, data))
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path / 's.safetensors'}: No space left"):
        write_selection(tmp_path / "s.safetensors", sel.indices, sel.meta)


def test_unwritable_output_directory_names_the_output(tiny_model, tmp_path, monkeypatch):
    """issue 11 item 14: a read-only parent names OUT; root ignores mode bits, so mkdtemp's refusal is simulated."""
    import tempfile

    from spinctl.errors import OutputError

    src = tiny_model("llama", "float32")
    sel = read_selection(make_selection(src, tmp_path))

    def refuse(prefix="", suffix="", dir=None):
        raise PermissionError(13, "Permission denied", f"{dir}/{prefix}abc123{suffix}")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(OutputError) as e:
        patch(PatchConfig(src, tmp_path / "ro" / "out"), sel)
    assert str(e.value).startswith(f"cannot create {tmp_path / 'ro' / 'out'}: Permission denied")
    assert "abc123" not in str(e.value)


def test_staged_output_is_fsynced_before_the_rename(tiny_model, tmp_path, monkeypatch):
    """issue 11 item 16: every copied non-weight file and the staged directory reach the disk before OUT appears."""
    src = tiny_model("llama", "float32")
    sel = read_selection(make_selection(src, tmp_path))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, **kw):
        events.append(("replace", str(b)))
        return real_replace(a, b, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    patch(PatchConfig(src, out), sel)
    final = events.index(("replace", str(out)))
    synced = {Path(p).name for kind, p in events[:final] if kind == "fsync"}
    staged = {Path(p) for kind, p in events[:final] if kind == "fsync" and Path(p).name.startswith(".out.")}
    assert staged, "the staged directory itself was not fsynced before the rename"
    for f in src.iterdir():
        assert f.name in synced, f"{f.name} was not fsynced before OUT was renamed into place"
