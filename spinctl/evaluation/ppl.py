"""Perplexity on a text file or on held-out prompt/response rows: a check that surgery left language modelling intact."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from spinctl.errors import InputError, UsageError
from spinctl.evaluation.heldout import Calibrated, heldout_rows, read_calibrated
from spinctl.runtime import check_device


def split_windows(n_tokens: int, seqlen: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows of `seqlen` tokens; a final window is kept when it
    has at least 2 tokens (one predicted token), so nothing scoreable is thrown away."""
    spans = [(s, min(s + seqlen, n_tokens)) for s in range(0, n_tokens, seqlen)]
    return [(s, e) for s, e in spans if e - s >= 2]


def read_text(text_path: str | Path) -> str:
    path = Path(text_path)
    if not path.is_file():
        raise InputError(f"text file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"text file {path} is not UTF-8 text") from None
    if not text.strip():
        raise InputError(f"text file {path} is empty")
    return text


@dataclass(frozen=True)
class PplData:
    """What perplexity is measured on: a plain text (windows) or held-out prompt/response rows."""

    path: Path
    text: str | None = None  # a .txt file
    prompts: tuple[str, ...] = ()  # a CSV/JSONL file: the held-out rows used
    responses: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()  # their row numbers in the file (0-based)
    excluded: int = 0  # rows skipped as calibration rows of a score file

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "rows"


def load_ppl_data(path: str | Path, n_rows: int = 64, calibrated: Sequence[Calibrated] = ()) -> PplData:
    """A .txt file as text; any other file as prompt/response rows: the first `n_rows` rows, in
    file order, that none of `calibrated` picked (score files scored on another file pick none)
    and whose response is not blank."""
    from spinctl.scoring.data import read_rows

    path = Path(path)
    if path.suffix.lower() == ".txt":
        return PplData(path, text=read_text(path))
    if n_rows < 1:
        raise InputError(f"--ppl-rows must be at least 1, got {n_rows}")
    rows = read_rows(path)
    free = heldout_rows(rows, calibrated)
    usable = [int(i) for i in free if rows.responses[i].strip()]
    if len(usable) < n_rows:
        raise InputError(
            f"{path}: only {len(usable)} held-out rows with a response (of {rows.count}; "
            f"{rows.count - len(free)} used for calibration); lower --rows (ppl) or --ppl-rows (sweep) to {len(usable)} or less"
        )
    picked = usable[:n_rows]
    return PplData(
        path,
        None,
        tuple(rows.prompts[i] for i in picked),
        tuple(rows.responses[i] for i in picked),
        tuple(picked),
        rows.count - len(free),
    )


def ppl_on_model(
    model, tok, data: PplData, seqlen: int = 2048, batch_size: int | None = None, max_length: int = 2048, progress=None
) -> dict:
    """Perplexity of a loaded model: exp(mean NLL per predicted token).

    Text: non-overlapping windows of `seqlen` tokens (batch 1 unless asked). Rows: the response
    tokens of each (prompt, response) row, prompt in the chat template (nll.response_nll),
    token-weighted over rows (batch 8 unless asked).
    """
    if data.kind == "text":
        return _text_ppl(model, tok, data, seqlen, batch_size or 1)
    from spinctl.evaluation.nll import response_nll

    res = response_nll(
        model, tok, data.prompts, data.responses, batch_size or 8, max_length, chat_template=True, progress=progress
    )
    tokens = int(res.tokens.sum())
    mean = float((res.mean * res.tokens).sum() / tokens)  # back to a per-token mean over all rows
    return {
        "kind": "rows",
        "rows": len(data.rows),
        "excluded_rows": data.excluded,
        "tokens": tokens,
        "nll": mean,
        "ppl": math.exp(mean),
    }


def _text_ppl(model, tok, data: PplData, seqlen: int, batch_size: int) -> dict:
    from spinctl.evaluation.nll import window_nll

    if seqlen < 2:
        raise InputError(f"--seqlen must be at least 2, got {seqlen}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise InputError(
            f"--seqlen {seqlen} exceeds the model's max_position_embeddings "
            f"({max_pos}); pass --seqlen {max_pos} or less"
        )
    # verbose=False: the "longer than model_max_length" warning is expected here, we window.
    ids = tok(data.text, return_tensors="pt", verbose=False)["input_ids"][0]  # [N]
    if ids.numel() < 2:
        raise InputError(f"text file {data.path} has {ids.numel()} token(s); need at least 2")
    windows = split_windows(ids.numel(), seqlen)
    total, count = window_nll(model, ids, windows, batch_size)
    mean = total / count
    return {
        "kind": "text",
        "tokens": int(ids.numel()),
        "windows": len(windows),
        "seqlen": seqlen,
        "nll": mean,
        "ppl": math.exp(mean),
    }


def perplexity(
    model_dir: str | Path,
    text_path: str | Path,
    seqlen: int = 2048,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    rows: int = 64,
    exclude: Sequence[str | Path] = (),
    max_length: int = 2048,
) -> dict:
    """Load the model and measure ppl_on_model on `text_path`.

    A .txt file is tokenized in one go with the tokenizer's usual special tokens (so a BOS,
    where the model has one, opens the first window only), the same as the common
    WikiText-2 recipe. A CSV/JSONL file of prompt/response rows is scored on its first `rows`
    rows not used for calibration by any `exclude` score file scored on it.
    """
    from spinctl.config import DTYPES
    from spinctl.runtime import load_causal_lm

    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {seqlen}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if rows < 1 or max_length < 2:  # load_ppl_data's own check would name sweep's --ppl-rows
        raise UsageError(f"--rows must be at least 1 and --max-length at least 2, got {rows} and {max_length}")
    check_device(device)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    data = load_ppl_data(text_path, rows, [read_calibrated(e) for e in exclude])
    model, tok = load_causal_lm(model_dir, device, dtype)
    try:
        result = ppl_on_model(model, tok, data, seqlen, batch_size, max_length)
    except InputError as e:
        # Errors about the model's own files (its chat template) already start with its path
        msg = str(e)
        raise InputError(msg if msg.startswith(f"{Path(model_dir)}:") else f"{model_dir}: {msg}") from None
    return {"model": str(model_dir), "file": str(text_path), **result, "seconds": round(time.perf_counter() - t0, 3)}
