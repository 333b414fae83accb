"""Cold start on a fresh install: `spinctl select` and `spinctl --help` from a new venv holding the project's wheel.

Builds a wheel (pip wheel --no-deps, build isolation: the kernels are compiled ahead of time
there), installs it with torch==2.13.0 into a new venv, writes bench_select.py's
Llama-2-7B-shaped top-K score files and times, from that venv: the first, second and warm
`spinctl select`; the same with SPINCTL_KERNELS=jit and numba's cache emptied (the JIT cold
start the compiled kernels replace); `spinctl --help`. Prints JSON lines. Needs pip's cache or
index to hold the dependencies; takes a few minutes, most of it building and installing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_select import llama7b_shapes, write_fake  # noqa: E402

TORCH = "torch==2.13.0"  # the CPU build, on local disk: a plain `torch` pulls a multi-GB CUDA build


def step(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Wall seconds of one run, and its stderr (where a kernel fallback notice would show)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed: {r.stderr.strip()}")
    return dt, r.stderr


def install(root: Path) -> tuple[Path, dict]:
    wheels = root / "wheels"
    build_s = step([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)])
    (wheel,) = wheels.glob("spinctl-*.whl")
    venv = root / "venv"
    t0 = time.perf_counter()
    step([sys.executable, "-m", "venv", str(venv)])
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    step(pip + [TORCH])
    step(pip + [str(wheel)])
    return venv, {
        "wheel": wheel.name,
        "build_s": round(build_s, 1),
        "venv_install_s": round(time.perf_counter() - t0, 1),
    }


def select_runs(spinctl: list[str], files: list[Path], keep: float, repeats: int, env: dict, cwd: Path) -> dict:
    cmd = spinctl + ["select", "--retain", str(files[0])]
    cmd += [a for f in files[1:] for a in ("--couple", str(f))]
    cmd += ["--p", str(keep), "--q", str(keep), "--mode", "paper", "-o", str(cwd / "sel.safetensors")]
    first, notice = timed(cmd, env, cwd)
    second, _ = timed(cmd, env, cwd)
    warm = statistics.median(timed(cmd, env, cwd)[0] for _ in range(repeats))
    return {
        "first_s": round(first, 3),
        "second_s": round(second, 3),
        "warm_s": round(warm, 3),
        "first_over_warm": round(first / warm, 2),
        "notice": notice.strip() or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep-dir", action="store_true", help="leave the wheel, venv and score files in place")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spinctl-bench-coldstart-"))
    try:
        venv, built = install(root)
        print(json.dumps({"bench": "coldstart_install", **built}), flush=True)
        files = [root / f"{n}.safetensors" for n in ("retain", "privacy", "fairness")]
        for seed, f in enumerate(files):
            write_fake(f, llama7b_shapes(), args.keep, seed)
        spinctl = [str(venv / "bin" / "spinctl")]
        env = {k: v for k, v in os.environ.items() if k not in ("SPINCTL_KERNELS", "PYTHONPATH", "NUMBA_CACHE_DIR")}
        # Runs in root, not the checkout: nothing but the venv's install can answer the imports.
        compiled = select_runs(spinctl, files, args.keep, args.repeats, env, root)
        kernels = (
            venv
            / "lib"
            / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "site-packages"
            / "spinctl_kernels"
        )
        for cached in kernels.glob("__pycache__/*.nb[ic]"):  # numba's JIT cache: the JIT run starts cold
            cached.unlink()
        jit = select_runs(spinctl, files, args.keep, args.repeats, {**env, "SPINCTL_KERNELS": "jit"}, root)
        for name, r in (("compiled", compiled), ("jit", jit)):
            line = {"bench": "coldstart_select", "kernels": name, "tensors": 224, "keep": args.keep, **r}
            print(json.dumps({**line, "target_first_over_warm": 1.5}), flush=True)
        print(
            json.dumps(
                {
                    "bench": "coldstart_select",
                    "compiled_first_over_jit_warm": round(compiled["first_s"] / jit["warm_s"], 2),
                }
            )
        )
        help_first, _ = timed(spinctl + ["--help"], env, root)
        help_warm = statistics.median(timed(spinctl + ["--help"], env, root)[0] for _ in range(5))
        print(
            json.dumps(
                {
                    "bench": "coldstart_help",
                    "first_s": round(help_first, 3),
                    "wall_s": round(help_warm, 3),
                    "target_s": 0.5,
                }
            )
        )
    finally:
        if args.keep_dir:
            print(json.dumps({"bench": "coldstart_dir", "path": str(root)}))
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
