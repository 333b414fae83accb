"""`spinctl demo --tiny`: the whole pipeline on a tiny random Llama and the built-in calibration sets, nothing to download."""

from __future__ import annotations

import re
import tempfile
from collections import defaultdict
from pathlib import Path

from spinctl.run import Log, run
from spinctl.runconfig import load_run_config

DEMO_YAML = """\
# Written by `spinctl demo`; run it again with: spinctl run {yaml}
model: model
output: patched
cache_dir: cache
retain: builtin:general
couple: [builtin:privacy, builtin:fairness]
score: {{method: snip, nsamples: 64, keep: 0.05, targets: mlp, max_length: 256, device: cpu, dtype: float32}}
select: {{p: 0.01, q: 0.03, mode: paper}}
eval: {{prompts: [builtin:eval_prompts], limit: 16, max_new_tokens: 16}}
"""


def build_demo_model(out: Path) -> Path:
    """A 4-layer random Llama whose tokenizer is trained on the built-in sets, so every token is real."""
    from spinctl.demo.tiny_models import build_tiny_model
    from spinctl.scoring.data import builtin_names, read_rows

    texts = []
    for name in builtin_names():
        if name == "eval_prompts":
            continue
        rows = read_rows(f"builtin:{name}")
        texts += rows.prompts + rows.responses
    return build_tiny_model(out, texts, arch="llama", layers=4, hidden=128, heads=4, kv_heads=2, vocab_size=1024)


def run_demo(workdir: Path | None = None, log: Log = lambda s: None) -> dict:
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="spinctl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"building a tiny random Llama in {workdir / 'model'}")
    build_demo_model(workdir / "model")
    yaml_path = workdir / "spin.yaml"
    yaml_path.write_text(DEMO_YAML.format(yaml=yaml_path))
    result = run(load_run_config(yaml_path), log)
    result["config"] = str(yaml_path)
    return result


def per_layer(per_tensor: dict[str, int]) -> dict[int, int]:
    layers: dict[int, int] = defaultdict(int)
    for name, count in per_tensor.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            layers[int(m.group(1))] += count
    return dict(sorted(layers.items()))


def report(result: dict, console) -> None:
    """Rich report: zeroed weights per layer, time per stage, verification, where the output is."""
    from rich.panel import Panel
    from rich.table import Table

    layers = per_layer(result["per_tensor"])
    top = max(layers.values(), default=0) or 1
    chart = Table(title="zeroed weights per decoder layer", show_header=False, box=None)
    for layer, count in layers.items():
        chart.add_row(
            f"layer {layer}", "[magenta]" + "█" * max(1 if count else 0, round(40 * count / top)) + "[/]", str(count)
        )
    console.print(chart)
    stages = Table(title="time per stage")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for stage, sec in result["seconds"].items():
        stages.add_row(stage, f"{sec:.2f}")
    console.print(stages)
    for row in result.get("eval") or []:
        rates = {k: row[k]["rate"] for k in ("original", "patched") if k in row}
        console.print(
            f"awareness on {row['prompts']} (keyword judge): "
            + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in rates.items())
        )
    status = "[green]verified[/]" if result["verified"] else "[red]NOT verified[/]"
    console.print(
        Panel(
            f"{result['selected']} weights zeroed, {status}\n"
            f"patched checkpoint: {result['output']}\nconfig: {result['config']}",
            title="spinctl demo",
        )
    )
