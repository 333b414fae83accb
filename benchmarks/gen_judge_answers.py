"""Generate the answers hand-labelled in tests/data/judge_labels.jsonl.

Picks rows reproducibly from each SALAD file: np.random.default_rng(0).permutation(n)[:N],
with n the number of data rows in that CSV and the row index 0-based among them; the
model answers greedily (spinctl.evaluation.evaluate.generate_answers: chat template, batch 16,
64 new tokens). Writes one JSON object per line: file, row, model, answer (no question).

    python benchmarks/gen_judge_answers.py MODEL_DIR TAG OUT.jsonl --n 100 \
        --data ../shared/data [--start 0]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

FILES = ("salad_privacy.csv", "salad_fairness.csv")


def picked_rows(path: Path, n: int, start: int = 0) -> tuple[list[int], list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        questions = [r["questions"] for r in csv.DictReader(f)]
    rows = np.random.default_rng(0).permutation(len(questions))[start:n].tolist()
    return rows, [questions[i] for i in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tag")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from spinctl.evaluation.evaluate import generate_answers

    with open(args.out, "w", encoding="utf-8") as out:
        for name in FILES:
            rows, questions = picked_rows(Path(args.data) / name, args.n, args.start)
            answers = generate_answers(args.model, questions, max_new_tokens=64, batch_size=16, device=args.device)
            for r, a in zip(rows, answers):
                out.write(json.dumps({"file": name, "row": r, "model": args.tag, "answer": a}) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
