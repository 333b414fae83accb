"""Issue 11 item 11: a pad token past the model's embedding (a fine-tune that added `<pad>`) must not break batching.

Pads are never attended (right padding under causal attention in score; masked left padding
in generation), so any in-vocabulary id pads the same: scores at batch size 4 equal the
batch-size-1 ones, which never pad.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_score import config, data_csv  # noqa: F401 (fixture)

from spinctl.io.formats import read_scores


@pytest.fixture(scope="module")
def pad_past_vocab(tiny_model, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    src = tiny_model("llama", "float32")
    model = Path(shutil.copytree(src, tmp_path_factory.mktemp("padvocab") / "model"))
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"pad_token": "<new_pad>"})
    assert tok.pad_token_id == len(tok) - 1
    tok.save_pretrained(model)
    import json

    assert tok.pad_token_id >= json.loads((model / "config.json").read_text())["vocab_size"]
    return model


@pytest.mark.parametrize("stream", [False, True], ids=["in_memory", "stream"])
@pytest.mark.parametrize("method", ["snip", "wanda"])
def test_batched_score_with_pad_past_vocab(pad_past_vocab, data_csv, tmp_path, stream, method):  # noqa: F811
    from spinctl.scoring.engine import score

    files = {}
    for bs in (1, 4):
        files[bs] = tmp_path / f"b{bs}.safetensors"
        score(config(pad_past_vocab, data_csv, files[bs], batch_size=bs, device="cpu", stream=stream, method=method))
    one, four = read_scores(files[1]), read_scores(files[4])
    for name in one.indices:
        assert np.array_equal(one.indices[name], four.indices[name]), name
        np.testing.assert_allclose(one.scores[name], four.scores[name], rtol=1e-4)


def test_batched_generation_with_pad_past_vocab(pad_past_vocab):
    from spinctl.evaluation.evaluate import generate_texts, load_causal_lm

    model, tok = load_causal_lm(pad_past_vocab, "cpu", "float32")
    prompts = ["Alice found", "Bob moved the old car near the river and", "they"]
    batched = generate_texts(model, tok, prompts, max_new_tokens=4, batch_size=3)
    alone = [generate_texts(model, tok, [p], max_new_tokens=4, batch_size=1)[0] for p in prompts]
    assert batched == alone
