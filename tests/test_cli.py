"""CLI contract: instant --help, python -m, one JSON object with --json, exit codes."""

import json

from clirun import cli, python
from fakes import fake_scores


def test_help_imports_neither_torch_nor_numba():
    code = ("import sys; from spinctl.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'numba', 'transformers') if m in sys.modules]; assert not bad, bad")
    r = python("-c", code)
    assert r.returncode == 0, r.stderr


def test_python_m_matches_script():
    r = cli("--help")
    assert r.returncode == 0 and "patch" in r.stdout and "verify" in r.stdout


def test_usage_error_exits_2():
    assert cli("patch").returncode == 2
    assert cli("no-such-command").returncode == 2


def test_json_prints_exactly_one_object(tiny_model, tmp_path):
    model = tiny_model("llama", "float32")
    files = [fake_scores(model, tmp_path / f"s{i}.safetensors", seed=i) for i in range(2)]
    r = cli("select", "--retain", files[0], "--couple", files[1], "--p", "0.01", "--q", "0.02",
            "-o", tmp_path / "sel.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["selected"] >= 0 and r.stdout.count("\n") == 1
    r = cli("inspect", model, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "checkpoint" and not info["patched"]


def test_error_is_one_line_without_traceback(tmp_path):
    r = cli("inspect", tmp_path / "missing.safetensors")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing.safetensors" in r.stderr


def test_eval_and_ppl_commands(tiny_model, tmp_path):
    model = tiny_model("llama", "float32")
    r = cli("eval", model, "--prompts", "builtin:eval_prompts", "--limit", "4", "--max-new-tokens", "4",
            "--compare", model, "--json")
    assert r.returncode == 0, r.stderr
    both = json.loads(r.stdout)
    assert both["original"]["n"] == 4 and both["original"]["rate"] == both["compare"]["rate"]
    text = tmp_path / "t.txt"
    text.write_text("Alice found the red box near the river. " * 20)
    r = cli("ppl", model, text, "--seqlen", "32", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ppl"] > 1
    r = cli("eval", model, "--prompts", text, "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
