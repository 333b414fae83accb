"""Bad models and data through the real CLI: a broken config.json, chat template or generation config,
weights that do not tile their file or do not match the config, text JSON cannot encode, `~user` paths.

Each gets exit 1 and one line on stderr naming the file and the reason: no traceback, no transformers
warning or LOAD REPORT lines before it. `outcomes` builds every selected case, then runs the
`python -m spinctl` processes two at a time (interpreter and torch start-up dominate). One
command per code path: the `~user` parser, the row reader and the chat-template renderer are
shared by every command that uses them, so a case per command would only add start-ups.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TEXTS
from test_bad_inputs import assert_clean_failure, run_cases, selected_cases

from spinctl.errors import InputError
from spinctl.io.checkpoint import read_shard

LOAD = "cannot load as a causal language model"  # the one line of a model transformers refuses
NOUSER = "~nosuchuser_spinctl_test/model"  # expanduser cannot expand it: there is no such user
SCORE = ["--nsamples", "4", "--device", "cpu", "--max-length", "64"]
EVAL = ["--device", "cpu", "--limit", "2", "--max-new-tokens", "4"]
PPL = ["--device", "cpu", "--rows", "4"]
# What transformers prints on its own when it is not kept quiet: none of it may reach stderr.
NOISE = ("Traceback", "[transformers]", "LOAD REPORT", "above report")


# ---- inputs ------------------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # ASCII: "\ud800" stays an escape
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path


def pairs(n: int = 16) -> list[dict]:
    return [{"prompt": t[:30], "response": t[30:]} for t in TEXTS[:n]]


def data(tmp: Path) -> Path:
    return write_rows(tmp / "data.csv", pairs())


def prompts(tmp: Path) -> Path:
    return write_rows(tmp / "prompts.csv", [{"questions": t} for t in TEXTS[:4]])


def edit_json(path: Path, **kw) -> None:
    d = json.loads(path.read_text())
    d.update(kw)
    path.write_text(json.dumps(d))


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict, payload: bytes) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + payload)
    return path


def drop_tensor(path: Path, name: str) -> None:
    """The header loses one entry; the other offsets stay, so its bytes become a gap."""
    header, payload = read_header(path)
    del header[name]
    write_raw(path, header, payload)


def transpose_tensor(path: Path, name: str) -> None:
    header, payload = read_header(path)
    header[name]["shape"] = header[name]["shape"][::-1]
    write_raw(path, header, payload)


# ---- the cases: builder(model, tmp) -> (argv, strings the error line must hold) -------------------------

CASES: dict = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


class Src:
    """The pristine tiny model; `copy` gives a case its own."""

    def __init__(self, model: Path):
        self.model = model

    def copy(self, tmp: Path) -> Path:
        return Path(shutil.copytree(self.model, tmp / "model"))


# 1. ~user that cannot be expanded: missing, as a shell would leave it


@case
def tilde_user_inspect(s, tmp):
    return ["inspect", NOUSER], [NOUSER, "no such file or directory"]


@case
def tilde_user_score(s, tmp):
    return ["score", NOUSER, data(tmp), "-o", tmp / "s.safetensors", *SCORE], [NOUSER]


@case
def tilde_user_eval_compare(s, tmp):
    return ["eval", s.copy(tmp), "--prompts", prompts(tmp), "--compare", NOUSER, *EVAL], [NOUSER]


# 2. lone surrogates, which JSON can spell and no tokenizer takes


def surrogate_rows(tmp: Path, column: str) -> Path:
    rows = pairs()
    rows[2][column] = "Alice \ud800 found"
    return write_rows(tmp / "data.jsonl", rows)


@case
def surrogate_in_prompt_score(s, tmp):
    f = surrogate_rows(tmp, "prompt")
    return ["score", s.copy(tmp), f, "-o", tmp / "s.safetensors", *SCORE], [f, "row 3", "Unicode"]


@case
def surrogate_in_eval_prompts(s, tmp):
    f = write_rows(tmp / "p.jsonl", [{"questions": "hi there"}, {"questions": "hi \udfff there"}])
    return ["eval", s.copy(tmp), "--prompts", f, *EVAL], [f, "row 2", "Unicode"]


# 3. chat templates that do not render


def template(m: Path, text: str) -> Path:
    (m / "chat_template.jinja").write_text(text)
    return m


@case
def chat_template_syntax_error_score(s, tmp):
    m = template(s.copy(tmp), "{% for %}")
    argv = ["score", m, data(tmp), "-o", tmp / "s.safetensors", *SCORE, "--chat-template"]
    return argv, [m, "chat template cannot be applied", "TemplateSyntaxError"]


@case
def chat_template_raises_eval(s, tmp):
    m = template(s.copy(tmp), "{{ raise_exception('nope') }}")
    return ["eval", m, "--prompts", prompts(tmp), *EVAL], [m, "chat template cannot be applied", "nope"]


@case
def chat_template_in_tokenizer_config_eval(s, tmp):
    m = s.copy(tmp)
    (m / "chat_template.jinja").unlink()
    edit_json(m / "tokenizer_config.json", chat_template="{{ messages[0]['content'] | nosuchfilter }}")
    return ["eval", m, "--prompts", prompts(tmp), *EVAL], [m, "chat template cannot be applied"]


def scored_with_config(s, tmp, edits: dict, expect: list, *extra):
    """`score` on a copy of the model whose config.json has `edits`; the error line must hold `expect`."""
    m = s.copy(tmp)
    edit_json(m / "config.json", **edits)
    return ["score", m, data(tmp), "-o", tmp / "s.safetensors", *SCORE, *extra], [m, *expect]


# 4. config.json values transformers refuses


@case
def config_hidden_size_string_score(s, tmp):
    return scored_with_config(s, tmp, {"hidden_size": "abc"}, [LOAD, "hidden_size"])


@case
def config_hidden_size_string_stream(s, tmp):
    return scored_with_config(s, tmp, {"hidden_size": "abc"}, [LOAD, "hidden_size"], "--stream")


@case
def config_heads_not_dividing_score(s, tmp):
    return scored_with_config(s, tmp, {"num_attention_heads": 3}, [LOAD, "attention heads (3)"])


@case
def config_heads_zero_score(s, tmp):
    return scored_with_config(s, tmp, {"num_attention_heads": 0}, [LOAD, "num_attention_heads is 0"])


@case
def config_heads_zero_stream(s, tmp):
    return scored_with_config(
        s,
        tmp,
        {"num_attention_heads": 0},
        [LOAD, "num_attention_heads is 0"],
        "--stream",
    )


# 5. generation_config.json whose token ids are not ids


@case
def generation_config_bad_ids_eval(s, tmp):
    m = s.copy(tmp)
    (m / "generation_config.json").write_text('{"eos_token_id": "abc", "pad_token_id": -5}')
    return ["eval", m, "--prompts", prompts(tmp), *EVAL], [m / "generation_config.json", "eos_token_id", "'abc'"]


# 6. a header entry dropped: its bytes become a gap safetensors refuses at load


@case
def weights_gap_score(s, tmp):
    m = s.copy(tmp)
    drop_tensor(m / "model.safetensors", "model.layers.0.mlp.up_proj.weight")
    argv = ["score", m, data(tmp), "-o", tmp / "s.safetensors", *SCORE]
    return argv, [m / "model.safetensors", "no tensor covers"]


# 7. config and weights that disagree: one self-contained line, no LOAD REPORT table before it


@case
def config_intermediate_mismatch_score(s, tmp):
    return scored_with_config(
        s,
        tmp,
        {"intermediate_size": 100},
        ["mlp.down_proj.weight is [64, 160] in the checkpoint but config.json makes it [64, 100]"],
    )


@case
def config_more_layers_score(s, tmp):
    return scored_with_config(s, tmp, {"num_hidden_layers": 4}, ["lacks 18 weight(s)", "model.layers.2."])


@case
def config_vocab_smaller_ppl(s, tmp):
    m = s.copy(tmp)
    edit_json(m / "config.json", vocab_size=10)
    return ["ppl", m, data(tmp), *PPL], [m, "in the checkpoint but config.json makes it [10, 64]"]


@case
def weights_transposed_eval(s, tmp):
    m = s.copy(tmp)
    transpose_tensor(m / "model.safetensors", "model.layers.0.mlp.up_proj.weight")
    argv = ["eval", m, "--prompts", prompts(tmp), *EVAL]
    return argv, [
        m,
        "model.layers.0.mlp.up_proj.weight is [64, 160] in the checkpoint but config.json makes it [160, 64]",
    ]


@case
def config_unknown_model_type_score(s, tmp):
    return scored_with_config(s, tmp, {"model_type": "nosucharch"}, [LOAD, "nosucharch"])


@case
def config_unknown_rope_type_score(s, tmp):
    return scored_with_config(
        s,
        tmp,
        {"rope_parameters": {"rope_type": "nosuch", "rope_theta": 10000.0, "factor": 2.0}},
        [LOAD, "unknown rope_type 'nosuch'"],
    )


# 8. GGUF hyperparameters that would divide by zero


@case
def gguf_head_count_zero_convert(s, tmp):
    gguf = pytest.importorskip("gguf")
    f = tmp / "m.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(4)
    w.add_feed_forward_length(8)
    w.add_head_count(0)
    w.add_head_count_kv(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    w.add_token_merges(["a b"])
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ["convert", f, tmp / "out"], [f, "llama.attention.head_count", "is 0"]


# ---- running them ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outcomes(tiny_model, tmp_path_factory, request) -> dict:
    selected = selected_cases(request, "test_bad_model")
    src = Src(tiny_model())
    prepared = {}
    for name in sorted(selected):
        tmp = tmp_path_factory.mktemp(name)
        try:
            argv, expect = CASES[name](src, tmp)
            prepared[name] = (tmp, argv, expect, sorted(p.name for p in tmp.iterdir()))
        except BaseException as e:  # noqa: BLE001 - reported by the case's own test (a skip included)
            prepared[name] = e
    return run_cases(prepared, 2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_model(outcomes, name):
    if isinstance(outcomes[name], BaseException):
        raise outcomes[name]
    tmp, argv, expect, before, r = outcomes[name]
    assert_clean_failure(r, ["error: ", *expect])
    assert not any(noise in r.stderr for noise in NOISE), r.stderr
    assert sorted(p.name for p in tmp.iterdir()) == before  # no output left behind


# ---- the safetensors layout rule, in process ----------------------------------------------------------


def u8(b: int, e: int) -> dict:
    return {"dtype": "U8", "shape": [e - b], "data_offsets": [b, e]}


@pytest.mark.parametrize(
    "header, size, pattern",
    [
        ({"a": u8(0, 4), "b": u8(6, 10)}, 10, r"tensor b starts at data offset 6, leaving 2 byte\(s\) after tensor a"),
        ({"a": u8(2, 6)}, 6, r"tensor a starts at data offset 2, leaving 2 byte\(s\) at the start of the data"),
        ({"a": u8(0, 4), "b": u8(4, 8)}, 10, r"the last 2 of its 10 data bytes belong to no tensor"),
        ({}, 3, r"the last 3 of its 3 data bytes belong to no tensor"),
        ({"a": u8(0, 4), "z": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]}, "b": u8(4, 8)}, 8, "overlap"),
    ],
)
def test_header_must_tile_the_data(tmp_path, header, size, pattern):
    """What safetensors refuses at load ("invalid offset", "file not fully covered") is refused when the header is read."""
    from safetensors import SafetensorError, safe_open

    f = write_raw(tmp_path / "x.safetensors", header, b"\0" * size)
    with pytest.raises(SafetensorError):
        with safe_open(str(f), framework="numpy") as g:
            list(g.keys())
    with pytest.raises(InputError, match=pattern):
        read_shard(f)


@pytest.mark.parametrize("seed", range(6))
def test_files_safetensors_writes_are_accepted(tmp_path, seed):
    """Random tensors (empty ones, odd byte counts, mixed dtypes, metadata) as safetensors itself saves them."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64, torch.bool, torch.uint8]
    tensors = {}
    for i in range(int(rng.integers(0, 12))):
        shape = [int(d) for d in rng.integers(0, 5, size=int(rng.integers(0, 4)))]
        dtype = dtypes[int(rng.integers(len(dtypes)))]
        tensors[f"t{i}.{rng.integers(1000)}"] = torch.zeros(shape, dtype=dtype)
    f = tmp_path / "ok.safetensors"
    save_file(tensors, str(f), metadata={"format": "pt"} if seed % 2 else None)
    shard = read_shard(f)
    assert set(shard.tensors) == set(tensors)


def test_model_load_restores_transformers_verbosity(tiny_model):
    from transformers.utils import logging as hf_logging

    from spinctl.runtime import load_model

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        load_model(tiny_model(), "cpu", "float32")
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(before)
