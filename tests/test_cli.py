"""CLI contract: instant --help, python -m, one JSON object with --json, exit codes."""

import json
import math

import pytest
from clirun import cli, python
from fakes import fake_scores


def test_help_imports_neither_torch_nor_numba():
    code = (
        "import sys; from spinctl.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "bad = [m for m in ('torch', 'numba', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    r = python("-c", code)
    assert r.returncode == 0, r.stderr


def test_python_m_matches_script():
    r = cli("--help")
    assert r.returncode == 0 and "patch" in r.stdout and "verify" in r.stdout


def test_usage_error_exits_2():
    assert cli("patch").returncode == 2
    assert cli("no-such-command").returncode == 2


# `spinctl` run from a script that registers an atexit handler and may leave a thread running.
EXIT = """
import atexit, sys, threading, time
from pathlib import Path
atexit.register(print, "atexit ran")
flag = Path(sys.argv[2])
if sys.argv[1] == "thread":  # a non-daemon thread still working when the command ends
    threading.Thread(target=lambda: (time.sleep(0.5), flag.write_text("done"))).start()
sys.argv = ["spinctl", *sys.argv[3:]]
from spinctl.cli import main
main()
print("not reached")
"""


@pytest.mark.parametrize("thread", [False, True])
def test_exit_skips_teardown_but_not_output_atexit_or_threads(tmp_path, thread):
    """cli._exit: the exit code, flushed output and atexit handlers are those of an ordinary exit,
    and a thread still running is waited for."""
    flag = tmp_path / "flag"
    r = python("-c", EXIT, "thread" if thread else "-", flag, "inspect", tmp_path / "missing.safetensors")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.safetensors" in r.stderr
    assert r.stdout == "atexit ran\n"
    assert flag.exists() == thread
    r = python("-c", EXIT, "-", flag, "--help")
    assert r.returncode == 0 and "patch" in r.stdout and r.stdout.endswith("atexit ran\n")


def test_json_prints_exactly_one_object(tiny_model, tmp_path):
    model = tiny_model("llama", "float32")
    files = [fake_scores(model, tmp_path / f"s{i}.safetensors", seed=i) for i in range(2)]
    r = cli(
        "select",
        "--retain",
        files[0],
        "--couple",
        files[1],
        "--p",
        "0.01",
        "--q",
        "0.02",
        "-o",
        tmp_path / "sel.safetensors",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["selected"] >= 0 and r.stdout.count("\n") == 1
    r = cli("inspect", model, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "checkpoint" and not info["patched"]


def test_error_is_one_line_without_traceback(tmp_path):
    r = cli("inspect", tmp_path / "missing.safetensors")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing.safetensors" in r.stderr


def text_nll(model_dir, text: str, seqlen: int) -> tuple[float, int]:
    """Summed next-token NLL and predicted-token count over non-overlapping `seqlen`-token windows
    (a last window of one token predicts nothing): the float32 model's logits, log-softmax in float64."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for s in range(0, len(ids), seqlen):
        w = torch.tensor([ids[s : s + seqlen]])  # [1, T]
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(w).logits[0, :-1].double(), dim=-1)  # [T-1, V]
        total -= logp.gather(1, w[0, 1:, None]).sum().item()
        count += w.shape[1] - 1
    return total, count


def test_eval_and_ppl_commands(tiny_model, tmp_path):
    model = tiny_model("llama", "float32")
    # The patched model: spinctl patch zeroes all of lm_head, so every logit is 0 and greedy
    # decoding emits token 0 (<unk>, a special token): every answer is empty, hence unjudgeable.
    lm_head = fake_scores(model, tmp_path / "lm_head.safetensors", seed=0, keep=1.0, names=["lm_head.weight"])
    patched = tmp_path / "patched"
    r = cli("patch", model, patched, "--retain", lm_head, "--couple", lm_head, "--p", "0", "--q", "1", "--json")
    assert r.returncode == 0, r.stderr
    config = json.loads((model / "config.json").read_text())
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    assert json.loads(r.stdout)["tensors"] == {"lm_head.weight": vocab * hidden}

    r = cli(
        "eval",
        model,
        "--prompts",
        "builtin:eval_prompts",
        "--limit",
        "4",
        "--max-new-tokens",
        "4",
        "--compare",
        patched,
        "--device",
        "cpu",
        "--save",
        tmp_path / "a.jsonl",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout)
    saved = {
        name: [json.loads(line)["answer"] for line in (tmp_path / name).read_text().splitlines()]
        for name in ("a.jsonl", "a.compare.jsonl")
    }  # one file per model, not one over the other
    assert any(saved["a.jsonl"]) and not any(saved["a.compare.jsonl"]), saved
    original, compare = both["original"], both["compare"]
    assert original["model"] == str(model) and compare["model"] == str(patched)
    assert original["n"] == compare["n"] == 4
    # The tiny model (float32 on the CPU) answers something to each question; the patched one nothing.
    assert original["unjudgeable"] == 0 and original["aware"] + original["unaware"] == 4, original
    assert original["rate"] == original["aware"] / 4
    assert (compare["aware"], compare["unaware"], compare["unjudgeable"], compare["rate"]) == (0, 0, 4, None), compare

    text = tmp_path / "t.txt"
    text.write_text("Alice found the red box near the river. " * 20)
    r = cli("ppl", model, text, "--seqlen", "32", "--device", "cpu", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    total, count = text_nll(model, text.read_text(), 32)
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # All-zero logits are the uniform distribution: perplexity is exactly the vocabulary size.
    r = cli("ppl", patched, text, "--seqlen", "32", "--device", "cpu", "--dtype", "float32", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ppl"] == pytest.approx(vocab, rel=1e-6)
    r = cli("eval", model, "--prompts", text, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
