"""Each option is defined once, in spinctl/config.py: the CLI flags, the spin.yaml keys and the
README's option tables are derived from it. `python tests/test_options.py` rewrites the tables."""

from __future__ import annotations

import re
import sys
from enum import Enum
from pathlib import Path

import pytest
import typer.main

from spinctl.cli import app
from spinctl.config import EvalConfig, PatchConfig, ReportConfig, ScoreConfig, SelectConfig, flag_name, options
from spinctl.runconfig import SECTIONS, load_run_config, section_checks

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES = {
    "score": ScoreConfig,
    "select": SelectConfig,
    "patch": PatchConfig,
    "eval": EvalConfig,
    "report": ReportConfig,
}
COMMANDS = {
    "score": [ScoreConfig],
    "select": [SelectConfig],
    "patch": [PatchConfig, SelectConfig],
    "eval": [EvalConfig],
    "report": [ReportConfig],
}
BLOCK = re.compile(r"(<!-- options: (\w+) -->\n)(.*?)(<!-- /options -->)", re.S)


def readme_table(section: str) -> str:
    """The README table of a config's options: flag and value, spin.yaml key, default, meaning."""
    cls = TABLES[section]
    lines = ["| flag | spin.yaml | default | meaning |", "|---|---|---|---|"]
    for f in options(cls):
        opt = f.metadata["opt"]
        flag = f"`{flag_name(f.name)}{' ' + opt.metavar if opt.metavar else ''}`".replace("|", "\\|")
        key = f"`{section}.{f.name}`" if opt.yaml else "–"
        default = opt.readme_default or (
            ""
            if f.default is None
            else "off"
            if f.default is False
            else f.default.value
            if isinstance(f.default, Enum)
            else _number(f.default)
            if isinstance(f.default, float)
            else str(f.default)
        )
        lines.append(f"| {flag} | {key} | {default} | {opt.help.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def _number(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-") if 0 < x < 1e-3 else f"{x:g}"


def test_readme_tables_match_the_definitions():
    found = {m.group(2): m.group(3) for m in BLOCK.finditer(README.read_text())}
    assert sorted(found) == sorted(TABLES), "README needs one <!-- options: NAME --> block per config"
    for section, text in found.items():
        assert text == readme_table(section), f"README's {section} table is stale: run python tests/test_options.py"


def _flags(command: str) -> dict[str, str]:
    click_cmd = typer.main.get_command(app).commands[command]
    return {opt: p.help for p in click_cmd.params for opt in getattr(p, "opts", [])}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_flags_come_from_the_configs(command):
    flags = _flags(command)
    for cls in COMMANDS[command]:
        for f in options(cls):
            assert flag_name(f.name) in flags, f"{command} lacks {flag_name(f.name)}"
            assert flags[flag_name(f.name)].startswith(f.metadata["opt"].help.replace("`", "")[:30])


def test_yaml_sections_are_the_configs_options():
    for section, cls in SECTIONS.items():
        keys = {f.name for f in options(cls) if f.metadata["opt"].yaml}
        assert keys <= set(section_checks(section))
    assert "trust_remote_code" in section_checks("score")  # once an "unknown key" (issue 12)
    assert {"dtype", "save", "device"} <= set(section_checks("eval"))


def test_every_command_takes_quiet_and_json():
    commands = typer.main.get_command(app).commands
    for name, cmd in commands.items():
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"--quiet", "--json"} <= opts, name


YAML = "model: m\noutput: out\nretain: r.csv\ncouple: [a.csv, b.csv]\n"


def test_yaml_errors_name_the_key_and_flags_name_the_flag(tmp_path):
    from spinctl.errors import InputError, UsageError

    (tmp_path / "m").mkdir()
    y = tmp_path / "spin.yaml"
    y.write_text(YAML + "score: {keep: 2}\n")
    with pytest.raises(InputError, match=r"score\.keep must be a number in \(0, 1\], got 2"):
        load_run_config(y)
    y.write_text(YAML + "score: {spill_dir: " + str(tmp_path) + "}\n")
    with pytest.raises(InputError, match=r"score\.spill_dir .*: applies to score\.stream only"):
        load_run_config(y)
    with pytest.raises(UsageError, match=r"^--spill-dir .*: applies to --stream only"):
        ScoreConfig(model="m", data="d", output="o", spill_dir=tmp_path)
    y.write_text(
        YAML + "select: {mode: reference}\ncouple: [a.csv, b.csv, c.csv]\n".replace("couple: [a.csv, b.csv]\n", "")
    )
    y.write_text("model: m\noutput: out\nretain: r.csv\ncouple: [a.csv, b.csv, c.csv]\nselect: {mode: reference}\n")
    with pytest.raises(InputError, match=r"select\.mode reference: takes exactly two"):
        load_run_config(y)


def test_yaml_sets_every_option(tmp_path):
    (tmp_path / "m").mkdir()
    y = tmp_path / "spin.yaml"
    y.write_text(
        YAML + "score: {device: cpu}\neval: {prompts: q.csv, dtype: float32, save: a.jsonl}\npatch: {force: true}\n"
    )
    cfg = load_run_config(y, ["score.trust_remote_code=true", "select.q=1e-3"])
    assert cfg.score.trust_remote_code is True and cfg.select.q == 1e-3 and cfg.patch.force is True
    assert cfg.eval.dtype == "float32" and cfg.eval.save == tmp_path / "a.jsonl"
    assert cfg.eval.device == "cpu"  # eval runs where scoring ran unless eval.device says otherwise
    assert cfg.eval_prompts == (str(tmp_path / "q.csv"),)


if __name__ == "__main__":
    text = README.read_text()
    README.write_text(BLOCK.sub(lambda m: m.group(1) + readme_table(m.group(2)) + m.group(4), text))
    print("README option tables rewritten", file=sys.stderr)
