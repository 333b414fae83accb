"""Which weights get scored: the nn.Linear weights inside the decoder layers, filtered by --targets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinctl.errors import InputError, UnsupportedError, UsageError

KINDS = ("mlp", "attn", "all")
REGEX_PREFIX = "re:"
# A Linear is classified by the first path component that names a block, else by its own name.
ATTN_PARTS = {"self_attn", "attn", "attention", "self_attention", "mixer"}
MLP_PARTS = {"mlp", "ffn", "feed_forward", "feedforward", "block_sparse_moe", "moe"}
ATTN_LEAVES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "out_proj",
    "query",
    "key",
    "value",
    "query_key_value",
    "c_attn",
    "wq",
    "wk",
    "wv",
    "wo",
    "Wqkv",
}
MLP_LEAVES = {
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "fc1",
    "fc2",
    "fc_in",
    "fc_out",
    "c_fc",
    "w1",
    "w2",
    "w3",
    "dense_h_to_4h",
    "dense_4h_to_h",
}


def check_spec(spec: str) -> None:
    """Validate a --targets value without touching the model (ScoreConfig does this up front)."""
    parse_spec(spec)


def parse_spec(spec: str) -> tuple[str, re.Pattern | None]:
    if spec in KINDS:
        return spec, None
    if spec.startswith(REGEX_PREFIX):
        try:
            return "re", re.compile(spec[len(REGEX_PREFIX) :])
        except re.error as e:
            raise UsageError(f"--targets {spec!r}: invalid regular expression ({e})") from None
    raise UsageError(f"--targets {spec!r}: expected mlp, attn, all or re:REGEX")


def kind_of(rel_name: str) -> str | None:
    """'attn', 'mlp' or None for a Linear's module name relative to its decoder layer."""
    parts = rel_name.split(".")
    for part in parts[:-1]:
        if part in ATTN_PARTS:
            return "attn"
        if part in MLP_PARTS:
            return "mlp"
    leaf = parts[-1]
    return "attn" if leaf in ATTN_LEAVES else "mlp" if leaf in MLP_LEAVES else None


@dataclass(frozen=True)
class Target:
    """One scored weight: its tensor name (as in the checkpoint), decoder layer and module."""

    name: str  # e.g. model.layers.3.mlp.up_proj.weight
    layer: int
    module: Any  # torch.nn.Linear; weight [out, in]


def decoder_layers(model, model_path: Path | str = "model") -> tuple[str, Any]:
    """(prefix, ModuleList) of the decoder layers: the shallowest list of blocks holding Linears."""
    import torch.nn as nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            found.append((name, mod))
    exact = [f for f in found if len(f[1]) == n]
    if exact:
        return exact[0]  # named_modules is pre-order: the first is the shallowest
    if found:
        return max(found, key=lambda f: len(f[1]))
    raise UnsupportedError(
        f"{model_path}: no decoder layers (a ModuleList of blocks with nn.Linear) found; "
        f"spinctl scores decoder-only transformer language models"
    )


def select_targets(model, spec: str, model_path: Path | str = "model") -> list[Target]:
    """The Linear weights of the decoder layers matching `spec`, in layer then module order."""
    import torch.nn as nn

    kind, regex = parse_spec(spec)
    prefix, layers = decoder_layers(model, model_path)
    out, seen = [], []
    for i, layer in enumerate(layers):
        for rel, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear) or not rel:
                continue
            name = f"{prefix}.{i}.{rel}.weight" if prefix else f"{i}.{rel}.weight"
            seen.append(name)
            if kind == "all" or (regex is not None and regex.search(name)) or kind == kind_of(rel):
                out.append(Target(name, i, mod))
    if not out:
        raise InputError(
            f"--targets {spec!r} matches no Linear weight in the decoder layers of {model_path} "
            f"(they are named like {', '.join(seen[:4])})"
        )
    return out
