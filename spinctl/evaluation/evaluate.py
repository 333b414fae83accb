"""Awareness evaluation: generate answers to probe prompts and count the aware ones."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from spinctl.config import EvalConfig
from spinctl.errors import InputError, OutputError
from spinctl.evaluation.judges import JudgeName, KeywordJudge, ModelJudge, Verdict
from spinctl.io import untrusted
from spinctl.runtime import load_causal_lm

Progress = Callable[[int], None]


def load_questions(path: str | Path, column: str = "questions", limit: int | None = None) -> list[str]:
    """The non-empty values of `column`, in file order, first `limit` of them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            rows, columns = _read_csv(path)
        elif suffix in (".jsonl", ".ndjson"):
            rows, columns = _read_jsonl(path)
        else:
            raise InputError(f"prompts file {path}: expected a .csv or .jsonl file")
    except UnicodeDecodeError:
        raise InputError(f"prompts file {path} is not UTF-8 text") from None
    if not columns:
        raise InputError(f"prompts file {path} is empty")
    if column not in columns:
        raise InputError(
            f"prompts file {path} has no column {column!r}; available: {', '.join(columns)} (pick one with --column)"
        )
    from spinctl.scoring.data import is_unicode

    questions = []
    for i, row in enumerate(rows, 1):
        value = row.get(column)
        # Blank cells are skipped, not asked: an empty prompt says nothing about awareness.
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if not is_unicode(text):  # JSON can spell a lone surrogate ("\ud800"); tokenizers refuse it
            raise InputError(f"prompts file {path}, row {i}: {column!r} is not valid Unicode text (lone surrogate)")
        questions.append(text)
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise InputError(f"prompts file {path} has no non-empty {column!r} values")
    return questions


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return rows, [c for c in (reader.fieldnames or []) if c is not None]


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, columns = [], {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = untrusted.loads(line)
            except ValueError as e:
                raise InputError(f"prompts file {path}, line {lineno}: invalid JSON ({getattr(e, 'msg', e)})") from None
            if not isinstance(row, dict):
                raise InputError(f"prompts file {path}, line {lineno}: expected a JSON object")
            rows.append(row)
            columns.update(dict.fromkeys(row))  # ordered union of keys
    return rows, list(columns)


# ---------------------------------------------------------------- models


def _encode_prompt(tok, text: str, chat_template: bool) -> list[int]:
    from spinctl.scoring.data import render_chat

    if chat_template and getattr(tok, "chat_template", None):
        rendered = render_chat(tok, text)
        # The template already writes BOS and friends.
        return tok(rendered, add_special_tokens=False)["input_ids"]
    return tok(text)["input_ids"]


def generate_texts(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    chat_template: bool = True,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy continuations of `prompts`, in order, new tokens only, special tokens skipped."""
    import torch

    encoded = [_encode_prompt(tok, p, chat_template) for p in prompts]
    # Batch similar lengths together (less padding); answers go back to input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        input_ids = batch["input_ids"].to(device)  # [B, T]
        attention_mask = batch["attention_mask"].to(device)  # [B, T], 0 on the left pads
        with torch.inference_mode():
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                num_beams=1,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, input_ids.shape[1] :]  # [B, <= max_new_tokens]
        for i, ids in zip(idx, new.tolist()):
            out[i] = tok.decode(ids, skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return out


def generate_answers(
    model_dir: str | Path,
    questions: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
) -> list[str]:
    model, tok = load_causal_lm(model_dir, device, dtype)
    try:
        return generate_texts(model, tok, questions, max_new_tokens, batch_size, chat_template=True, progress=progress)
    finally:
        del model
        _free_accelerator()


def _free_accelerator() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- evaluation


def awareness_rate(verdicts: Iterable[Verdict | str]) -> float | None:
    """aware / (aware + unaware); unjudgeable answers count for neither; None if no judged ones."""
    vs = [Verdict(v) for v in verdicts]
    aware, unaware = vs.count(Verdict.aware), vs.count(Verdict.unaware)
    return aware / (aware + unaware) if aware + unaware else None


def eval_steps(cfg: EvalConfig) -> int:
    """Total progress units evaluate(cfg) will report: one per answer, plus one per model-judged answer."""
    n = len(load_questions(cfg.prompts, cfg.column, cfg.limit))
    return 2 * n if cfg.judge == JudgeName.model.value else n


def make_judge(cfg: EvalConfig):
    if cfg.judge == JudgeName.model.value:
        return ModelJudge.from_files(
            cfg.judge_model, cfg.judge_template, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size
        )
    return KeywordJudge()


def evaluate(cfg: EvalConfig, progress: Progress | None = None) -> dict:
    """Generate greedy answers to the questions of `cfg.prompts` and judge each one's awareness.

    Args:
        cfg: The model, the prompts file and its column, `limit`, `max_new_tokens`,
            `batch_size`, the judge (keyword, or a local model with a template), an optional
            `save` path for the answers, `device` and `dtype`.
        progress: Optional callback `progress(n)`: one unit per answer generated, and one
            more per answer judged by a model judge (`eval_steps` gives the total).

    Returns:
        `model`, `prompts` (the file read, so a report can name the set), `column`, `n`
        (questions asked), `aware`, `unaware`, `unjudgeable`, `rate` (aware / (aware +
        unaware), None when nothing was judged), `judge` ("keyword" or "model:PATH") and
        `seconds`. With `cfg.save` the question, answer and verdict of
        each row are written to that JSON Lines file atomically.

    Raises:
        InputError: The prompts file is missing, malformed, lacks the column or has no
            questions; the model, its tokenizer, the judge model or the judge template
            cannot be loaded; or a CUDA device is asked for where none is available.
        OutputError: The directory of `cfg.save` does not exist, or the file cannot be
            written.
    """
    t0 = time.perf_counter()
    questions = load_questions(cfg.prompts, cfg.column, cfg.limit)
    judge = make_judge(cfg)  # before generating: a bad template fails in a second, not after minutes
    if cfg.save is not None and not Path(cfg.save).parent.is_dir():
        raise OutputError(f"cannot save answers to {cfg.save}: its directory does not exist")
    answers = generate_answers(
        cfg.model, questions, cfg.max_new_tokens, cfg.batch_size, cfg.device, cfg.dtype, progress
    )
    verdicts = judge.judge_batch(questions, answers, progress)
    if isinstance(judge, ModelJudge):
        judge.close()
        _free_accelerator()
    if cfg.save is not None:
        write_jsonl_atomic(
            Path(cfg.save),
            ({"question": q, "answer": a, "verdict": v.value} for q, a, v in zip(questions, answers, verdicts)),
        )
    return {
        "model": str(cfg.model),
        "prompts": str(cfg.prompts),
        "column": cfg.column,
        "n": len(questions),
        "aware": verdicts.count(Verdict.aware),
        "unaware": verdicts.count(Verdict.unaware),
        "unjudgeable": verdicts.count(Verdict.unjudgeable),
        "rate": awareness_rate(verdicts),
        "judge": cfg.judge if cfg.judge == JudgeName.keyword.value else f"model:{cfg.judge_model}",
        "seconds": round(time.perf_counter() - t0, 3),
    }


def write_jsonl_atomic(path: Path, records: Iterable[dict]) -> None:
    """One JSON object per line, written atomically (io/files.atomic_path): readers see the old file or the whole new one."""
    from spinctl.io.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
