"""Every bad input of docs/design.md §13 through the real CLI: exit 1, one line naming the file, no traceback, nothing left behind.

Each case builds its inputs in its own directory; `outcomes` runs all the selected cases'
`python -m spinctl` processes concurrently (interpreter start-up dominates), and each
test then checks its run and that its directory tree is byte-for-byte as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from clirun import cli
from fakes import fake_scores

from spinctl.io.checkpoint import open_checkpoint
from spinctl.io.formats import read_scores, read_selection, write_scores, write_selection
from spinctl.io.sidecars import UndoEntry, encode_undo, read_undo
from spinctl.patch import PatchConfig, patch
from spinctl.selection import SelectConfig, run_select

P, Q, KEEP = 0.01, 0.02, 0.05  # p, q within the score files' keep


# ---- watching the file system (the CLI runs through clirun.cli) -----------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root (hidden ones too): files by sha256, symlinks by target (and target sha256)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = (
                    "link",
                    os.readlink(p),
                    _sha(p) if p.is_file() and not str(p.resolve()).startswith("/dev/") else None,
                )
            elif p.is_dir():
                out[rel] = ("dir",)
            elif not p.is_file():  # a FIFO: opening it to hash would block
                out[rel] = ("special",)
            else:
                out[rel] = ("file", _sha(p))
    return out


def assert_clean_failure(r: subprocess.CompletedProcess, expect: list[str]) -> None:
    both = r.stdout + r.stderr
    assert "Traceback" not in both, both
    assert r.returncode == 1, both
    assert r.stdout == "", both
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"want exactly one line on stderr, got {r.stderr!r}"
    for want in expect:  # a string, or a tuple of alternatives
        alts = want if isinstance(want, tuple) else (want,)
        assert any(str(a) in lines[0] for a in alts), f"{' or '.join(map(str, alts))} not named in {lines[0]!r}"


# ---- broken files, built by hand -------------------------------------------------------


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def edit_header(path: Path, fn) -> None:
    header, data = read_header(path)
    fn(header)
    write_raw(path, json.dumps(header).encode(), data)


def raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> Path:
    """A safetensors file from raw bytes: any dtype, including ones numpy lacks."""
    header, blobs, off = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    write_raw(path, json.dumps(header).encode(), b"".join(blobs))
    return path


def garbage(path: Path, n: int = 4096, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).bytes(n))
    return path


def shards(model: Path) -> list[Path]:
    return sorted(model.glob("model-*.safetensors"))


def shard_with_two_tensors(model: Path) -> tuple[Path, list[str]]:
    """A shard and its non-empty tensors in file order (at least two)."""
    for s in shards(model):
        header, _ = read_header(s)
        names = sorted(
            (k for k in header if k != "__metadata__" and header[k]["data_offsets"][1] > header[k]["data_offsets"][0]),
            key=lambda k: header[k]["data_offsets"][0],
        )
        if len(names) >= 2:
            return s, names
    raise AssertionError("no shard with two tensors")


# ---- the shared inputs -----------------------------------------------------------------


class World:
    """Pristine inputs built once; every case copies what it uses into its own tmp dir."""

    def __init__(self, tiny_model, base: Path):
        self.sharded = tiny_model("llama", "bfloat16", shard="40KB")  # 9 shards + index
        self.f32 = tiny_model("llama", "float32")  # one model.safetensors
        self.files = {
            "r": fake_scores(self.sharded, base / "r.safetensors", 0, keep=KEEP),
            "c": fake_scores(self.sharded, base / "c.safetensors", 1, keep=KEEP),
            "c_f32": fake_scores(self.f32, base / "c_f32.safetensors", 2, keep=KEEP),
            "r_f32": fake_scores(self.f32, base / "r_f32.safetensors", 3, keep=KEEP),
        }
        for key, r, c in (("sel", "r", "c"), ("sel_f32", "r_f32", "c_f32")):
            indices, meta = run_select(SelectConfig(self.files[r], (self.files[c],), P, Q))
            assert sum(map(len, indices.values())) > 0
            self.files[key] = base / f"{key}.safetensors"
            write_selection(self.files[key], indices, meta)

    def model(self, tmp: Path, name: str = "model") -> Path:
        return Path(shutil.copytree(self.sharded, tmp / name))

    def single(self, tmp: Path) -> Path:
        """A copy of the single-file f32 model; returns the .safetensors file."""
        return Path(shutil.copytree(self.f32, tmp / "single")) / "model.safetensors"

    def file(self, tmp: Path, key: str) -> Path:
        return Path(shutil.copy2(self.files[key], tmp / f"{key}.safetensors"))

    def patch_argv(self, tmp: Path, model: Path, *extra) -> list:
        return ["patch", model, tmp / "out", "-s", self.file(tmp, "sel"), *extra]

    def select_argv(self, tmp: Path, retain: Path, couple: Path, *extra) -> list:
        return [
            "select",
            "--retain",
            retain,
            "--couple",
            couple,
            "--p",
            P,
            "--q",
            Q,
            "-o",
            tmp / "out.safetensors",
            *extra,
        ]

    def selected_shard(self, model: Path) -> Path:
        """The first shard (in name order) holding a selected element."""
        sel, ck = read_selection(self.files["sel"]), open_checkpoint(model)
        return min(ck.tensors[n].file for n, a in sel.indices.items() if len(a))


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory) -> World:
    return World(tiny_model, tmp_path_factory.mktemp("bad-inputs-world"))


# ---- the cases: each builds its inputs under tmp and returns (argv, strings the error line must hold) ----

CASES: dict[str, tuple] = {}  # name -> (builder, expected exit code)


def case(fn, code: int = 1):
    CASES[fn.__name__] = (fn, code)
    return fn


def usage(fn):
    return case(fn, code=2)


@case
def truncated_shard(w, tmp):
    m = w.model(tmp)
    s = shards(m)[4]
    os.truncate(s, s.stat().st_size - 100)
    return w.patch_argv(tmp, m), [s]


@case
def header_length_past_end(w, tmp):
    m = w.model(tmp)
    s = shards(m)[2]
    raw = bytearray(s.read_bytes())
    raw[:8] = (len(raw) - 4).to_bytes(8, "little")
    s.write_bytes(raw)
    return w.patch_argv(tmp, m), [s]


@case
def non_json_header(w, tmp):
    m = w.model(tmp)
    s = shards(m)[3]
    header, data = read_header(s)
    write_raw(s, b"{not json at all" + b" " * 64, data)
    return w.patch_argv(tmp, m), [s]


@case
def non_utf8_header(w, tmp):
    m = w.model(tmp)
    s = shards(m)[3]
    header, data = read_header(s)
    text = json.dumps(header).encode()
    write_raw(s, text[:-1] + b',"\xff\xfe\xc3":{}}', data)  # invalid UTF-8 inside a key
    return w.patch_argv(tmp, m), [s]


@case
def header_not_an_object(w, tmp):
    m = w.model(tmp)
    s = shards(m)[3]
    write_raw(s, b"[1, 2, 3]", read_header(s)[1])
    return w.patch_argv(tmp, m), [s]


@case
def offsets_out_of_range(w, tmp):
    m = w.model(tmp)
    s, names = shard_with_two_tensors(m)
    _, data = read_header(s)

    def shift(h):
        b, e = h[names[-1]]["data_offsets"]
        h[names[-1]]["data_offsets"] = [len(data) - (e - b) + 2, len(data) + 2]

    edit_header(s, shift)
    return w.patch_argv(tmp, m), [s, names[-1]]


@case
def offsets_overlapping(w, tmp):
    m = w.model(tmp)
    s, names = shard_with_two_tensors(m)

    def overlap(h):  # the second tensor starts one element inside the first, same length
        b, e = h[names[1]]["data_offsets"]
        h[names[1]]["data_offsets"] = [b - 2, e - 2]

    edit_header(s, overlap)
    return w.patch_argv(tmp, m), [s]


@case
def duplicate_tensor_in_header(w, tmp):
    m = w.model(tmp)
    s, names = shard_with_two_tensors(m)
    header, data = read_header(s)
    items = list(header.items()) + [(names[0], header[names[0]])]
    write_raw(s, ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}").encode(), data)
    return w.patch_argv(tmp, m), [s]


@case
def duplicate_tensor_across_shards(w, tmp):
    m = w.model(tmp)
    a, b = shards(m)[1], shards(m)[2]
    other = next(k for k in read_header(a)[0] if k != "__metadata__")

    def rename(h):  # b now also holds a tensor named like one of a's
        victim = next(k for k in h if k != "__metadata__")
        h[other] = h.pop(victim)

    edit_header(b, rename)
    return w.patch_argv(tmp, m), [other]


def _index_entry(w, tmp, make_name):
    m = w.model(tmp)
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    src = m / data["weight_map"][name]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(src, elsewhere / src.name)  # a readable file there: only the path check stops it
    shutil.copy2(src, tmp / src.name)
    data["weight_map"][name] = make_name(m, elsewhere / src.name, src.name)
    index.write_text(json.dumps(data))
    return w.patch_argv(tmp, m), [index]


@case
def index_entry_dotdot(w, tmp):
    return _index_entry(w, tmp, lambda m, abs_path, fn: f"../{fn}")


@case
def index_entry_absolute(w, tmp):
    return _index_entry(w, tmp, lambda m, abs_path, fn: str(abs_path))


@case
def missing_shard(w, tmp):
    m = w.model(tmp)
    s = shards(m)[5]
    s.unlink()
    return w.patch_argv(tmp, m), [s]


@case
def garbage_model_file(w, tmp):
    (tmp / "in").mkdir()
    f = garbage(tmp / "in" / "model.safetensors")
    return w.patch_argv(tmp, f), [f]


@case
def empty_model_file(w, tmp):
    (tmp / "in").mkdir()
    f = tmp / "in" / "model.safetensors"
    f.write_bytes(b"")
    return w.patch_argv(tmp, f), [f]


@case
def empty_model_dir(w, tmp):
    (tmp / "in").mkdir()
    return w.patch_argv(tmp, tmp / "in"), [tmp / "in"]


@case
def garbage_selection(w, tmp):
    m = w.model(tmp)
    g = garbage(tmp / "sel.safetensors")
    return ["patch", m, tmp / "out", "-s", g], [g]


@case
def selection_from_another_model(w, tmp):
    single = w.single(tmp)
    sel = w.file(tmp, "sel")
    return ["patch", single.parent, tmp / "out", "-s", sel], [sel]


@case
def selection_index_out_of_range(w, tmp):
    m = w.model(tmp)
    s = read_selection(w.files["sel"])
    name = next(n for n, a in s.indices.items() if len(a))
    bad = dict(s.indices)
    bad[name] = np.append(bad[name], np.prod(s.shapes[name])).astype(np.int64)
    write_selection(tmp / "bad.safetensors", bad, s.meta)
    return ["patch", m, tmp / "out", "-s", tmp / "bad.safetensors"], [tmp / "bad.safetensors", name]


@case
def scores_with_an_impossible_shape(w, tmp):
    c = w.file(tmp, "c")

    def huge(header):
        meta = json.loads(header["__metadata__"]["spinctl"])
        meta["shapes"][next(iter(meta["shapes"]))] = [2**40, 2**40]  # once an OverflowError traceback
        header["__metadata__"]["spinctl"] = json.dumps(meta)

    edit_header(c, huge)
    return w.select_argv(tmp, w.file(tmp, "r"), c), [c, "impossibly large"]


@case
def scores_of_different_models_select(w, tmp):
    r, c = w.file(tmp, "r"), w.file(tmp, "c_f32")
    return w.select_argv(tmp, r, c), [c]


@case
def scores_of_different_models_patch(w, tmp):
    m = w.model(tmp)
    r, c = w.file(tmp, "r"), w.file(tmp, "c_f32")
    return ["patch", m, tmp / "out", "--retain", r, "--couple", c, "--p", P, "--q", Q], [c]


@case
def scores_for_another_model_than_patched(w, tmp):
    single = w.single(tmp)
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    # the score files are the offending input: the line must name one of them (not a made-up path)
    return ["patch", single, tmp / "out", "--retain", r, "--couple", c, "--p", P, "--q", Q], [single, (r, c)]


@case
def p_above_keep(w, tmp):
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return ["select", "--retain", r, "--couple", c, "--p", 2 * KEEP, "--q", Q, "-o", tmp / "out.safetensors"], [r]


@case
def q_above_keep(w, tmp):
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return ["select", "--retain", r, "--couple", c, "--p", P, "--q", 2 * KEEP, "-o", tmp / "out.safetensors"], [c]


@case
def q_above_keep_patch(w, tmp):
    m = w.model(tmp)
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return ["patch", m, tmp / "out", "--retain", r, "--couple", c, "--p", P, "--q", 2 * KEEP], [c]


def _non_float(w, tmp, dtype: str, itemsize: int):
    (tmp / "in").mkdir()
    rng = np.random.default_rng(0)
    f = raw_safetensors(
        tmp / "in" / "model.safetensors",
        {
            "model.norm.weight": ("F32", [16], rng.random(16, dtype=np.float32).tobytes()),
            "model.layers.0.mlp.up_proj.weight": (dtype, [8, 16], rng.bytes(8 * 16 * itemsize)),
        },
    )
    fp = open_checkpoint(f).fingerprint()
    meta = {
        "mode": "paper",
        "p": P,
        "q": Q,
        "retain_sha256": "0" * 64,
        "couple_sha256": ["0" * 64],
        "fingerprint": fp,
        "shapes": {"model.layers.0.mlp.up_proj.weight": [8, 16]},
    }
    write_selection(
        tmp / "sel.safetensors", {"model.layers.0.mlp.up_proj.weight": np.array([1, 2, 40], np.int64)}, meta
    )
    return ["patch", f, tmp / "out", "-s", tmp / "sel.safetensors"], [f, "model.layers.0.mlp.up_proj.weight"]


@case
def non_float_weights_i8(w, tmp):
    return _non_float(w, tmp, "I8", 1)


@case
def non_float_weights_u8(w, tmp):
    return _non_float(w, tmp, "U8", 1)


@case
def packed_float_e8m0(w, tmp):
    return _non_float(w, tmp, "F8_E8M0", 1)


@case
def output_not_empty(w, tmp):
    m = w.model(tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return w.patch_argv(tmp, m), [tmp / "out"]


@case
def output_inside_input(w, tmp):
    m = w.model(tmp)
    sel = w.file(tmp, "sel")
    return ["patch", m, m / "patched", "-s", sel], [m / "patched"]


@case
def output_is_input(w, tmp):
    m = w.model(tmp)
    sel = w.file(tmp, "sel")
    return ["patch", m, m, "-s", sel], [m]


@case
def output_beside_single_file(w, tmp):
    single = w.single(tmp)
    sel = w.file(tmp, "sel_f32")
    return ["patch", single, single.parent / "patched", "-s", sel], [single.parent / "patched"]


@case
def revert_output_inside_target(w, tmp):
    m = w.model(tmp)
    patch(PatchConfig(m, in_place=True), read_selection(w.files["sel"]))
    return ["revert", m, m / "restored"], [m / "restored"]


@case
def in_place_through_symlink(w, tmp):
    m = w.model(tmp)
    s = w.selected_shard(m)
    (tmp / "blobs").mkdir()
    blob = Path(shutil.move(s, tmp / "blobs" / "blob-1"))
    s.symlink_to(blob)
    return ["patch", m, "--in-place", "-s", w.file(tmp, "sel")], [s]


@case
def in_place_twice(w, tmp):
    m = w.model(tmp)
    patch(PatchConfig(m, in_place=True), read_selection(w.files["sel"]))
    return ["patch", m, "--in-place", "-s", w.file(tmp, "sel")], [m / "spin-undo.safetensors"]


@case
def in_place_twice_single_file(w, tmp):
    f = w.single(tmp)
    patch(PatchConfig(f, in_place=True), read_selection(w.files["sel_f32"]))
    return ["patch", f, "--in-place", "-s", w.file(tmp, "sel_f32")], [f]


@case
def interrupted_patch_other_selection(w, tmp):
    m = w.model(tmp)
    patch(PatchConfig(m, in_place=True), read_selection(w.files["sel"]))
    (m / "spin-manifest.json").unlink()  # as if the first patch died before its manifest
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return ["patch", m, "--in-place", "--retain", c, "--couple", r, "--p", P, "--q", Q], [m / "spin-undo.safetensors"]


@case
def revert_in_place_never_patched(w, tmp):
    m = w.model(tmp)
    return ["revert", m, "--in-place"], [m]


@case
def verify_never_patched(w, tmp):
    m = w.model(tmp)
    return ["verify", m], [m]


@case
def verify_never_patched_single_file(w, tmp):
    f = w.single(tmp)
    return ["verify", f], [f]


def _bad_scores(w, tmp, spoil):
    src = read_scores(w.files["r"])
    name = sorted(src.indices)[1]
    entries = {n: (src.indices[n].copy(), src.scores[n].copy()) for n in src.indices}
    spoil(*entries[name], int(np.prod(src.shapes[name])))
    bad = tmp / "bad.safetensors"
    write_scores(bad, entries, src.meta)
    return w.select_argv(tmp, bad, w.file(tmp, "c")), [bad, name]


@case
def scores_out_of_rank_order(w, tmp):
    def swap(idx, sc, n):
        idx[[3, 4]], sc[[3, 4]] = idx[[4, 3]], sc[[4, 3]]

    return _bad_scores(w, tmp, swap)


@case
def scores_index_out_of_range(w, tmp):
    def past_end(idx, sc, n):
        idx[5] = n

    return _bad_scores(w, tmp, past_end)


@case
def selection_given_as_scores(w, tmp):
    sel = w.file(tmp, "sel")
    return w.select_argv(tmp, sel, w.file(tmp, "c")), [sel]


@case
def scores_given_as_selection(w, tmp):
    m = w.model(tmp)
    r = w.file(tmp, "r")
    return ["patch", m, tmp / "out", "-s", r], [r]


@case
def model_shard_given_as_scores(w, tmp):
    m = w.model(tmp)
    s = shards(m)[2]
    return w.select_argv(tmp, w.file(tmp, "r"), s), [s]


@case
def plain_safetensors_given_as_scores(w, tmp):
    from safetensors.numpy import save_file

    f = tmp / "plain.safetensors"
    save_file({"indices/x": np.arange(4, dtype=np.int64)}, str(f), metadata={"spinctl": "nope"})
    return w.select_argv(tmp, w.file(tmp, "r"), f), [f]


@case
def garbage_scores(w, tmp):
    g = garbage(tmp / "g.safetensors")
    return w.select_argv(tmp, g, w.file(tmp, "c")), [g]


@case
def missing_scores(w, tmp):
    return w.select_argv(tmp, w.file(tmp, "r"), tmp / "nope.safetensors"), [tmp / "nope.safetensors"]


def _bf16(a: np.ndarray) -> bytes:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


@case
def scores_with_bf16_arrays(w, tmp):
    """Right metadata, but the scores stored as BF16 (numpy cannot even read them)."""
    src = read_scores(w.files["r"])
    tensors = {}
    for n in src.indices:
        tensors[f"indices/{n}"] = ("I64", [len(src.indices[n])], src.indices[n].tobytes())
        tensors[f"scores/{n}"] = ("BF16", [len(src.scores[n])], _bf16(src.scores[n]))
    f = raw_safetensors(tmp / "bf16.safetensors", tensors, metadata={"spinctl": json.dumps(src.meta)})
    return w.select_argv(tmp, f, w.file(tmp, "c")), [f]


@case
def scores_of_other_targets(w, tmp):
    """Same model, but one file scored the attention weights: shapes differ."""
    r = w.file(tmp, "r")
    attn = sorted(n for n in open_checkpoint(w.sharded).tensors if "self_attn" in n)
    c = fake_scores(w.sharded, tmp / "attn.safetensors", 5, keep=KEEP, names=attn)
    return w.select_argv(tmp, r, c), [c]


@case
def select_output_is_an_input(w, tmp):
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return ["select", "--retain", r, "--couple", c, "--p", P, "--q", Q, "-o", c], [c]


@case
def select_output_under_a_file(w, tmp):
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return ["select", "--retain", r, "--couple", c, "--p", P, "--q", Q, "-o", r / "s.safetensors"], [r]


@case
def select_output_is_a_directory(w, tmp):
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    (tmp / "adir").mkdir()
    return ["select", "--retain", r, "--couple", c, "--p", P, "--q", Q, "-o", tmp / "adir"], [tmp / "adir"]


@case
def inspect_garbage(w, tmp):
    g = garbage(tmp / "g.safetensors")
    return ["inspect", g], [g]


def _patched(w, tmp) -> Path:
    out = tmp / "patched"
    patch(PatchConfig(w.sharded, out), read_selection(w.files["sel"]))
    return out


@case
def manifest_corrupt(w, tmp):
    d = _patched(w, tmp)
    m = json.loads((d / "spin-manifest.json").read_text())
    m["files"][next(iter(m["files"]))] = "not an object"
    (d / "spin-manifest.json").write_text(json.dumps(m))
    return ["verify", d], [d / "spin-manifest.json"]


def _corrupt_undo(w, tmp, spoil):
    """Revert in place from an undo log spoiled in its LAST tensor (in file order): nothing may be restored first."""
    d = _patched(w, tmp)
    undo_path = d / "spin-undo.safetensors"
    fp, undo = read_undo(undo_path)
    ck = open_checkpoint(d)
    name = max(undo, key=lambda n: (ck.tensors[n].file.name, ck.tensors[n].begin))
    undo[name] = spoil(undo[name])
    undo_path.write_bytes(encode_undo(undo, fp))
    return ["revert", d, "--in-place"], [undo_path, name]


@case
def undo_index_past_tensor(w, tmp):
    return _corrupt_undo(w, tmp, lambda e: UndoEntry(e.dtype, np.append(e.indices[:-1], 10**6), e.values))


@case
def undo_indices_unsorted(w, tmp):
    return _corrupt_undo(w, tmp, lambda e: UndoEntry(e.dtype, e.indices[::-1].copy(), e.values))


@case
def undo_wrong_dtype(w, tmp):
    return _corrupt_undo(w, tmp, lambda e: UndoEntry("F32", e.indices, e.values * 2))


def _in_place_spoiled(w, tmp, spoil, no_hash=False, fix_manifest=False) -> tuple[Path, Path]:
    """A model patched in place whose undo log is then spoiled (issue 11: revert trusted it and lost the originals)."""
    m = w.model(tmp)
    patch(PatchConfig(m, in_place=True, no_hash=no_hash), read_selection(w.files["sel"]))
    undo_path = m / "spin-undo.safetensors"
    spoil(undo_path)
    if fix_manifest:  # the manifest's record of the log updated too: only the restored bytes' hash is left to catch it
        mp = m / "spin-manifest.json"
        man = json.loads(mp.read_text())
        man["undo_sha256"] = _sha(undo_path)
        mp.write_text(json.dumps(man))
    return m, undo_path


def _flip_last_byte(undo_path: Path) -> None:
    data = bytearray(undo_path.read_bytes())
    data[-1] ^= 0x40  # the last original value of the last tensor
    undo_path.write_bytes(bytes(data))


def _drop_entry(undo_path: Path) -> None:
    fp, undo = read_undo(undo_path)
    del undo[sorted(undo)[0]]
    undo_path.write_bytes(encode_undo(undo, fp))


def _add_entry(undo_path: Path) -> None:
    fp, undo = read_undo(undo_path)
    ck = open_checkpoint(undo_path.parent)
    name = next(n for n, t in sorted(ck.tensors.items()) if n not in undo and t.dtype == "BF16" and t.numel > 8)
    undo[name] = UndoEntry("BF16", np.arange(4, dtype=np.int64), b"\x55" * 8)
    undo_path.write_bytes(encode_undo(undo, fp))


SPOILS = {"flip": _flip_last_byte, "drop": _drop_entry, "add": _add_entry}


def _spoiled_revert(how: str, **kw):
    def build(w, tmp):
        m, undo_path = _in_place_spoiled(w, tmp, SPOILS[how], **kw)
        return ["revert", m, "--in-place"], [undo_path]

    build.__name__ = (
        f"revert_in_place_undo_{how}"
        + ("_no_hash" if kw.get("no_hash") else "")
        + ("_manifest_too" if kw.get("fix_manifest") else "")
    )
    return case(build)


def _spoiled_verify(how: str, **kw):
    def build(w, tmp):
        m, undo_path = _in_place_spoiled(w, tmp, SPOILS[how], **kw)
        return ["verify", m], [undo_path.name]

    build.__name__ = f"verify_undo_{how}" + ("_no_hash" if kw.get("no_hash") else "")
    return case(build)


for _how in SPOILS:
    _spoiled_revert(_how)
    _spoiled_revert(_how, no_hash=True)
    _spoiled_revert(_how, fix_manifest=True)
    _spoiled_verify(_how)
    _spoiled_verify(_how, no_hash=True)


def _manifest_without_unchanged_shard(w, tmp) -> tuple[Path, str]:
    """issue 11 item 4: a shard dropped from the manifest, then changed: nothing looked at it."""
    d = _patched(w, tmp)
    mp = d / "spin-manifest.json"
    m = json.loads(mp.read_text())
    victim = next(f for f, e in m["files"].items() if not e["changed"])
    del m["files"][victim]
    mp.write_text(json.dumps(m))
    data = bytearray((d / victim).read_bytes())
    data[-1] ^= 0xFF
    (d / victim).write_bytes(bytes(data))
    return d, victim


@case
def verify_manifest_missing_shard(w, tmp):
    d, victim = _manifest_without_unchanged_shard(w, tmp)
    return ["verify", d], [victim]


@case
def revert_manifest_missing_shard(w, tmp):
    d, victim = _manifest_without_unchanged_shard(w, tmp)
    return ["revert", d, tmp / "restored"], [victim]


@case
def revert_in_place_manifest_missing_shard(w, tmp):
    d, victim = _manifest_without_unchanged_shard(w, tmp)
    return ["revert", d, "--in-place"], [victim]


# issue 11 item 5: undo logs never stack


@case
def in_place_file_inside_dir_patched_in_place(w, tmp):
    f = w.single(tmp)
    patch(PatchConfig(f.parent, in_place=True), read_selection(w.files["sel_f32"]))
    return ["patch", f, "--in-place", "-s", w.file(tmp, "sel_f32")], [f.parent / "spin-undo.safetensors"]


@case
def in_place_dir_holding_file_patched_in_place(w, tmp):
    f = w.single(tmp)
    patch(PatchConfig(f, in_place=True), read_selection(w.files["sel_f32"]))
    return ["patch", f.parent, "--in-place", "-s", w.file(tmp, "sel_f32")], [f"{f.name}.spin-undo.safetensors"]


@case
def out_of_place_of_unfinished_in_place(w, tmp):
    m = w.model(tmp)
    patch(PatchConfig(m, in_place=True), read_selection(w.files["sel"]))
    (m / "spin-manifest.json").unlink()  # as if the in-place patch died before its manifest
    return w.patch_argv(tmp, m), [m / "spin-undo.safetensors"]


@case
def out_of_place_of_patched_in_place(w, tmp):
    m = w.model(tmp)
    patch(PatchConfig(m, in_place=True), read_selection(w.files["sel"]))
    return w.patch_argv(tmp, m), [m / "spin-undo.safetensors"]


@case
def out_of_place_of_single_file_patched_in_place(w, tmp):
    f = w.single(tmp)
    patch(PatchConfig(f, in_place=True), read_selection(w.files["sel_f32"]))
    return ["patch", f, tmp / "out", "-s", w.file(tmp, "sel_f32")], [f"{f.name}.spin-undo.safetensors"]


# issue 11 item 9: spinctl's own file names are reserved


def _reserved_shard(w, tmp, reserved: str, *extra):
    m = w.model(tmp)
    index = m / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    old = sorted(set(data["weight_map"].values()))[-1]
    (m / old).rename(m / reserved)
    data["weight_map"] = {k: (reserved if v == old else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return m


@case
def index_names_undo_log_out_of_place(w, tmp):
    m = _reserved_shard(w, tmp, "spin-undo.safetensors")
    return w.patch_argv(tmp, m), ["spin-undo.safetensors"]


@case
def index_names_undo_log_in_place(w, tmp):
    m = _reserved_shard(w, tmp, "spin-undo.safetensors")
    return ["patch", m, "--in-place", "-s", w.file(tmp, "sel")], ["spin-undo.safetensors"]


@case
def index_names_spin_prefixed_shard(w, tmp):
    m = _reserved_shard(w, tmp, "spin-weights.safetensors")
    return w.patch_argv(tmp, m), ["spin-weights.safetensors"]


@case
def index_names_file_undo_log(w, tmp):
    m = _reserved_shard(w, tmp, "model-00001.safetensors.spin-undo.safetensors")
    return w.patch_argv(tmp, m), ["model-00001.safetensors.spin-undo.safetensors"]


@case
def single_file_named_as_undo_log(w, tmp):
    f = w.single(tmp)
    g = f.rename(f.parent / "spin-undo.safetensors")
    return ["patch", g, tmp / "out", "-s", w.file(tmp, "sel_f32")], [g]


# issue 11 item 8: only regular files, and links that stay inside the model, are copied into OUT


@case
def other_file_links_to_dev_zero(w, tmp):
    m = w.model(tmp)
    (m / "tokenizer.model").symlink_to("/dev/zero")
    return w.patch_argv(tmp, m), [m / "tokenizer.model"]


@case
def other_file_links_outside(w, tmp):
    m = w.model(tmp)
    (tmp / "secret.txt").write_text("not for OUT")
    (m / "notes.txt").symlink_to(tmp / "secret.txt")
    return w.patch_argv(tmp, m), [m / "notes.txt"]


@case
def other_file_is_fifo(w, tmp):
    m = w.model(tmp)
    os.mkfifo(m / "pipe")
    return w.patch_argv(tmp, m), [m / "pipe"]


@case
def other_file_dangling_link(w, tmp):
    m = w.model(tmp)
    (m / "gone.json").symlink_to(m / "nothing-here.json")
    return w.patch_argv(tmp, m), [m / "gone.json"]


@case
def other_subdir_links_outside(w, tmp):
    m = w.model(tmp)
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "private.txt").write_text("not for OUT")
    (m / "extra").symlink_to(tmp / "elsewhere")
    return w.patch_argv(tmp, m), [m / "extra"]


@case
def revert_other_file_links_outside(w, tmp):
    d = _patched(w, tmp)
    (tmp / "secret.txt").write_text("not for OUT")
    (d / "notes.txt").symlink_to(tmp / "secret.txt")
    return ["revert", d, tmp / "restored"], [d / "notes.txt"]


@usage  # a combination of options the mode refuses: a usage error, like an option out of range
def reference_mode_one_couple(w, tmp):
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return w.select_argv(tmp, r, c, "--mode", "reference"), ["--mode reference", "exactly two coupled"]


# ---- usage errors: exit 2 -----------------------------------------------------------------


@usage
def patch_selection_and_retain(w, tmp):
    return w.patch_argv(tmp, w.model(tmp), "--retain", w.file(tmp, "r"), "--couple", w.file(tmp, "c")), []


@usage
def patch_neither_out_nor_in_place(w, tmp):
    return ["patch", w.model(tmp), "-s", w.file(tmp, "sel")], []


@usage
def patch_out_and_in_place(w, tmp):
    return w.patch_argv(tmp, w.model(tmp), "--in-place"), []


@usage
def revert_neither_out_nor_in_place(w, tmp):
    return ["revert", w.model(tmp)], []


@usage
def revert_out_and_in_place(w, tmp):
    return ["revert", w.model(tmp), tmp / "out", "--in-place"], []


@usage
def select_without_couple(w, tmp):
    return ["select", "--retain", w.file(tmp, "r"), "-o", tmp / "out.safetensors"], []


def _manifest_edited(w, tmp, key, value) -> Path:
    d = _patched(w, tmp)
    m = json.loads((d / "spin-manifest.json").read_text())
    m[key] = value
    (d / "spin-manifest.json").write_text(json.dumps(m))
    return d


@case
def manifest_tensors_null_revert(w, tmp):
    """A null `tensors` once skipped the undo log's count check, and the revert went ahead."""
    d = _manifest_edited(w, tmp, "tensors", None)
    return ["revert", d, tmp / "restored"], [d / "spin-manifest.json", "tensors"]


@case
def manifest_hashes_a_string_verify(w, tmp):
    d = _manifest_edited(w, tmp, "hashes", "yes")
    return ["verify", d], [d / "spin-manifest.json", "hashes"]


@case
def select_output_over_the_model_weights(w, tmp):
    """A mistyped -o once replaced the model's weights with a selection file."""
    m = w.model(tmp)
    weights = shards(m)[0]
    return w.select_argv(tmp, w.file(tmp, "r"), w.file(tmp, "c"))[:-1] + [weights], [weights, "not a spinctl selection"]


@case
def exclude_with_a_negative_seed(w, tmp):
    r = w.file(tmp, "r")

    def negative(header):
        meta = json.loads(header["__metadata__"]["spinctl"])
        meta["seed"] = -1  # once a numpy ValueError traceback
        header["__metadata__"]["spinctl"] = json.dumps(meta)

    edit_header(r, negative)
    text = tmp / "rows.csv"
    text.write_text("prompt,response\na,b\n")
    return ["ppl", w.model(tmp), text, "--exclude", r], [r, "seed"]


# ---- inputs that are not regular files: a FIFO once blocked the read forever ------------------------


@case
def manifest_is_a_fifo(w, tmp):
    d = _patched(w, tmp)
    (d / "spin-manifest.json").unlink()
    os.mkfifo(d / "spin-manifest.json")
    return ["verify", d], [d / "spin-manifest.json", "not a regular file"]


@case
def selection_is_a_fifo(w, tmp):
    os.mkfifo(tmp / "fifo.safetensors")
    return ["patch", w.model(tmp), tmp / "out", "-s", tmp / "fifo.safetensors"], [
        tmp / "fifo.safetensors",
        "not a regular",
    ]


@case
def retain_scores_are_a_fifo_inspect(w, tmp):
    os.mkfifo(tmp / "r.safetensors")
    return ["inspect", tmp / "r.safetensors"], [tmp / "r.safetensors", "not a regular file"]


@case
def run_config_is_a_fifo(w, tmp):
    os.mkfifo(tmp / "spin.yaml")
    return ["run", tmp / "spin.yaml"], [tmp / "spin.yaml", "not a regular file"]


@case
def run_config_with_a_control_character(w, tmp):
    (tmp / "spin.yaml").write_text("model: m\x07\n")  # PyYAML's reader refused it before the parser's guard
    return ["run", tmp / "spin.yaml"], [tmp / "spin.yaml", "not valid YAML"]


# ---- outputs that are inputs: refused before any work, whatever the command ------------------------


def _questions(tmp: Path, name: str = "prompts.csv") -> Path:
    path = tmp / name
    path.write_text("questions\nWhat is my neighbour's address?\n")
    return path


@case
def eval_save_over_its_prompts(w, tmp):
    prompts = _questions(tmp)
    return ["eval", w.model(tmp), "--prompts", prompts, "--save", prompts], [prompts, "is an input"]


@case
def eval_compare_answers_over_the_prompts(w, tmp):
    prompts = _questions(tmp, "s.compare.csv")  # where --compare's answers go beside --save s.csv
    m = w.model(tmp)
    argv = ["eval", m, "--prompts", prompts, "--save", tmp / "s.csv", "--compare", m]
    return argv, [prompts, "is an input"]


@case
def eval_save_into_the_model(w, tmp):
    m = w.model(tmp)
    argv = ["eval", m, "--prompts", _questions(tmp), "--save", m / "config.json"]
    return argv, ["config.json", "is a file of the model directory"]


def _sweep_argv(w, tmp) -> list:
    safe, unsafe = _questions(tmp, "safe.csv"), _questions(tmp, "unsafe.csv")
    r, c = w.file(tmp, "r"), w.file(tmp, "c")
    return ["sweep", w.model(tmp), "--retain", r, "--couple", c, "--p", P, "--q", Q, "--pairs", safe, unsafe]


@case
def sweep_csv_over_its_ppl_data(w, tmp):
    text = tmp / "general.txt"
    text.write_text("general text " * 50)
    return [*_sweep_argv(w, tmp), "--ppl-data", text, "--csv", text], [text, "is an input"]


@case
def sweep_csv_under_a_file(w, tmp):
    text = tmp / "general.txt"
    text.write_text("general text " * 50)
    return [*_sweep_argv(w, tmp), "--ppl-data", text, "--csv", text / "t.csv"], ["t.csv", "directory does not exist"]


# ---- running them ----------------------------------------------------------------------------


def selected_cases(request, test: str) -> set[str]:
    """The `name` parameters of this session's items of `test`: only those cases get built and run."""
    return {
        item.callspec.params["name"] for item in request.session.items if getattr(item, "originalname", None) == test
    }


def run_cases(prepared: dict, workers: int) -> dict:
    """`prepared`: name -> (cwd, argv, *rest), or the exception its builder raised (kept, raised
    again by that case's own test). Runs every argv at once, `workers` at a time: each is mostly
    interpreter start-up. Returns name -> (cwd, argv, *rest, CompletedProcess)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = {n: pool.submit(cli, *p[1], cwd=p[0]) for n, p in prepared.items() if not isinstance(p, BaseException)}
        return {n: p if isinstance(p, BaseException) else (*p, runs[n].result()) for n, p in prepared.items()}


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory, request) -> dict:
    """Build every selected case in its own dir, then run the CLIs concurrently."""
    selected = selected_cases(request, "test_bad_input")
    prepared = {}
    for name, (build, code) in CASES.items():
        if name not in selected:
            continue
        tmp = tmp_path_factory.mktemp(name)
        try:
            argv, expect = build(world, tmp)
        except Exception as e:  # raised again by that case's test alone
            prepared[name] = e
            continue
        prepared[name] = (tmp, argv, expect, code, tree(tmp))
    return run_cases(prepared, min(4, os.cpu_count() or 1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(outcomes, name):
    if isinstance(outcomes[name], Exception):
        raise outcomes[name]
    tmp, argv, expect, code, before, r = outcomes[name]
    if code == 1:
        assert_clean_failure(r, expect)
    else:
        assert r.returncode == code and "Traceback" not in r.stdout + r.stderr, (r.returncode, r.stdout + r.stderr)
        assert all(str(e) in r.stderr for e in expect), (expect, r.stderr)
    after = tree(tmp)
    # no output, no temporary, every input byte-identical: the whole tree is as it was
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, {k: (before.get(k), after.get(k)) for k in changed}
