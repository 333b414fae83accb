"""Layer-streamed model access (--stream): a meta-device skeleton, one decoder layer's weights at a time, layer inputs caught."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spinctl.errors import InputError, UnsupportedError
from spinctl.io.checkpoint import Checkpoint, TensorEntry
from spinctl.scoring.targets import decoder_layers

SUPPORTED = ("llama", "mistral", "qwen2")  # decoder layers called as layer(hidden, **kwargs) -> hidden
TORCH_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@contextlib.contextmanager
def params_on_meta():
    """Parameters are created on the meta device (no memory), buffers as usual. A plain
    `torch.device("meta")` would leave buffers that __init__ computes and checkpoints never
    store (the rotary inv_freq) without values."""
    import torch.nn as nn

    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_tensor(entry: TensorEntry, device, dtype):
    """One checkpoint tensor from its validated byte range, on `device` in `dtype` (pinned staging for CUDA)."""
    import torch

    if entry.dtype not in TORCH_DTYPES:
        raise UnsupportedError(
            f"{entry.file}: tensor {entry.name} has dtype {entry.dtype}; --stream reads "
            f"{', '.join(TORCH_DTYPES)} weights only; score without --stream"
        )
    nbytes = entry.end - entry.begin
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        got = f.readinto(memoryview(buf.numpy()))
    if got != nbytes:
        raise InputError(
            f"{entry.file}: tensor {entry.name}: file ends {nbytes - got} bytes early; the shard is truncated"
        )
    t = buf.view(getattr(torch, TORCH_DTYPES[entry.dtype])).reshape(entry.shape)
    return t.to(device=device, dtype=dtype)  # CPU and the same dtype: `buf` itself, no copy


@dataclass
class Skeleton:
    """The model with its parameters on the meta device until `load` puts a part of them on `device`."""

    path: Path
    model: Any
    tokenizer: Any
    ckpt: Checkpoint
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    prefix: str  # of the decoder layers, e.g. "model.layers"
    layers: Any  # nn.ModuleList
    # id(parameter) -> [(owner module, attribute, full name), ...]: tied weights are one parameter under two names
    _params: dict[int, list[tuple[Any, str, str]]] = field(default_factory=dict, repr=False)

    def param_groups(self, part: int | str) -> list[list[tuple[Any, str, str]]]:
        """Parameters of a part: decoder layer i; "embed", everything before the layers (all
        outside them but the final norm and lm_head); "head", the final norm and lm_head.
        A weight tied between the embedding and the head belongs to both."""
        layers = f"{self.prefix}."
        if isinstance(part, int):
            pick = lambda n: n.startswith(f"{layers}{part}.")  # noqa: E731
        elif part == "head":
            pick = self._head_names().__contains__
        else:
            head = self._head_names()
            pick = lambda n: not n.startswith(layers) and n not in head  # noqa: E731
        return [g for g in self._params.values() if any(pick(n) for _, _, n in g)]

    def _head_names(self) -> set[str]:
        where = {id(m): name for name, m in self.model.named_modules(remove_duplicate=False)}
        return {
            f"{where[id(m)]}.{n}".lstrip(".")
            for m in self.head()
            for n, _ in m.named_parameters(remove_duplicate=False)
        }

    def fetch(self, part: int | str) -> dict[str, Any]:
        """A part's weights read onto the device but not yet in the model, by name: what `load`
        installs. Reads files only, so it may run on prefetch.py's worker thread."""
        return {g[0][2]: self._read(g) for g in self.param_groups(part) if self._on_meta(g)}

    def load(self, part: int | str, fetched: dict[str, Any] | None = None) -> None:
        """A part's weights (see `param_groups`) onto the device: those in `fetched`, the rest read now."""
        import torch.nn as nn

        fetched = fetched or {}
        for group in self.param_groups(part):
            if not self._on_meta(group):
                continue  # loaded already (a tied weight)
            t = fetched.get(group[0][2])
            p = nn.Parameter(self._read(group) if t is None else t, requires_grad=False)
            for owner, attr, _ in group:
                owner._parameters[attr] = p

    @staticmethod
    def _on_meta(group) -> bool:
        owner, attr, _ = group[0]
        return getattr(owner, attr).device.type == "meta"

    def _read(self, group):
        """One parameter (all names of a tied one) from the shards, checked against the model's shape."""
        owner, attr, _ = group[0]
        meta = getattr(owner, attr)
        entry = next((self.ckpt.tensors[n] for _, _, n in group if n in self.ckpt.tensors), None)
        if entry is None:
            raise UnsupportedError(
                f"{self.path}: the checkpoint lacks {group[0][2]}, which the model needs; "
                f"is it complete and of this architecture?"
            )
        if tuple(entry.shape) != tuple(meta.shape):
            raise UnsupportedError(
                f"{self.path}: tensor {entry.name} is stored as {list(entry.shape)}, the model "
                f"needs {list(meta.shape)}; is the config of this checkpoint?"
            )
        return read_tensor(entry, self.device, meta.dtype)

    def unload(self, part: int | str) -> None:
        """Back to meta: the device memory of those weights is free again."""
        import torch
        import torch.nn as nn

        for group in self.param_groups(part):
            owner, attr, _ = group[0]
            p = getattr(owner, attr)
            meta = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            for owner, attr, _ in group:
                owner._parameters[attr] = meta

    def head(self):
        """(final norm, lm_head): hidden states [B, T, D] -> logits [B, T, V]."""
        norm = getattr(self.model.base_model, "norm", None)
        lm_head = self.model.get_output_embeddings()
        if norm is None or lm_head is None:
            raise UnsupportedError(
                f"{self.path}: no final norm or lm_head found; --stream supports {', '.join(SUPPORTED)}"
            )
        return norm, lm_head


def build_skeleton(path: Path, ckpt: Checkpoint, tokenizer, device, dtype, trust_remote_code: bool = False) -> Skeleton:
    """The model from config.json with meta parameters; buffers (rotary tables) on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    opts = {"trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **opts)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RecursionError) as e:
        raise InputError(
            f"{path}: cannot read config.json ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from None
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise UnsupportedError(
            f"{path}: --stream supports {', '.join(SUPPORTED)} models, not {kind!r}; score it without --stream"
        )
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **opts)
    model.requires_grad_(False)
    model.eval()
    for mod in model.modules():  # buffers are tiny (rotary tables): all of them go to the device now
        for name, buf in list(mod._buffers.items()):
            if buf is not None:
                if buf.device.type == "meta":
                    raise UnsupportedError(
                        f"{path}: buffer {name} of {type(mod).__name__} has no value off a checkpoint load"
                    )
                mod._buffers[name] = buf.to(device)
    prefix, layers = decoder_layers(model, path)
    sk = Skeleton(path, model, tokenizer, ckpt, device, dtype, prefix, layers)
    for full, p in model.named_parameters(remove_duplicate=False):
        owner_name, _, attr = full.rpartition(".")
        sk._params.setdefault(id(p), []).append((model.get_submodule(owner_name), attr, full))
    return sk


class _Stop(Exception):
    """Raised by the last catcher: the forward ends before the final norm."""


def catch_layer_inputs(sk: Skeleton, ids):
    """Run the model up to its decoder layers on ids [B, T]: (hidden [B, T, D] entering layer 0,
    one (by_kw, args, kwargs) per layer). As pruning tools (SparseGPT, Wanda) do, catchers stand
    in for the layers and record what they receive (attention mask, position ids, rotary cos/sin);
    each passes the hidden states through, so every layer gets its own record (mask types may
    alternate by layer), and the last one stops the forward."""
    import torch
    import torch.nn as nn

    n, first, calls = len(sk.layers), [], []

    class Catcher(nn.Module):
        def __init__(self, i: int, layer):
            super().__init__()
            self.i = i
            self.__dict__["layer"] = layer  # not a submodule: no parameters of its own

        def __getattr__(self, name):  # the model may read the layer's attributes (attention_type)
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.__dict__["layer"], name)

        def forward(self, *args, **kwargs):
            by_kw = not args
            hidden = kwargs.pop("hidden_states") if by_kw else args[0]
            if self.i == 0:
                first.append(hidden)
            calls.append((by_kw, tuple(args[1:]), kwargs))
            if self.i == n - 1:
                raise _Stop
            return hidden

    originals = list(sk.layers)
    for i in range(n):
        sk.layers[i] = Catcher(i, originals[i])
    try:
        with torch.no_grad():
            sk.model.base_model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(originals):
            sk.layers[i] = layer
    if len(first) != 1 or len(calls) != n:
        raise UnsupportedError(
            f"{sk.path}: the model does not call its decoder layers once each, in order; --stream cannot score it"
        )
    return first[0], calls


def call_layer(layer, x, call: tuple[bool, tuple, dict]):
    """layer(x) with the arguments caught for it; x [B, T, D] -> [B, T, D]."""
    by_kw, args, kwargs = call
    out = layer(*args, hidden_states=x, **kwargs) if by_kw else layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out
