"""Writing a stock safetensors checkpoint tensor by tensor, never holding the whole state dict.

Shape legend: none (tensors of any shape).

``save_pretrained`` needs every tensor in memory at once, then serialises them into one more copy
(``safetensors.torch.save_file`` turns each tensor into bytes before writing). A checkpoint bigger
than memory is written here instead:

1. the *layout* (every saved name with its dtype and shape) comes from the model built on the meta
   device: :func:`saved_layout` applies what ``save_pretrained`` applies to the state dict (tied
   weights removed, ``_keys_to_ignore_on_save`` dropped, transformers' ``revert_weight_conversion``,
   which gives the original checkpoint names, e.g. Qwen3-MoE's per-expert ``gate_proj``), on meta
   tensors, so it costs no memory;
2. :class:`SafetensorsWriter` writes the header for that layout (each tensor's byte range, in
   layout order, the header padded to 8 bytes as ``safetensors`` does) and preallocates the file;
3. the caller hands over the model's tensors a *chunk* at a time (one decoder layer, say):
   :meth:`SafetensorsWriter.write_model_chunk` reverts that chunk alone (every conversion of
   transformers' mapping works within one layer) and ``os.pwrite``\\ s each tensor at its offset, so
   chunks may come in any order; ``close`` checks every tensor was written exactly once.

The file is a plain safetensors file (``metadata={"format": "pt"}`` as transformers writes it);
``AutoModelForCausalLM.from_pretrained`` and ``safetensors.safe_open`` read it. :class:`ShardedWriter`
splits a layout into shards as ``save_pretrained`` does (its ``max_shard_size``, 50 GB by default)
with the ``model.safetensors.index.json`` that names each tensor's file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import CheckpointError, MoelabError

# safetensors dtype names (the format's header strings) and the torch dtypes they hold
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # saved name -> (dtype, shape)


def savable_state(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as ``save_pretrained`` saves it, before reverting names: tied weights
    removed (one name kept), ``_keys_to_ignore_on_save`` dropped. Works on the meta device."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    return remove_tied_weights_from_state_dict(state, model)


def revert_names(model: nn.Module, chunk: dict[str, Tensor]) -> dict[str, Tensor]:
    """``chunk`` (model keys -> tensors) under the names ``save_pretrained`` writes: transformers'
    ``revert_weight_conversion`` of the model's conversion mapping (a no-op for families without one)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(chunk))


def layer_chunks(keys: list[str]) -> list[list[str]]:
    """State-dict keys grouped by numbered layer (``model.layers.3.``...: every conversion of
    transformers' mapping stays within one), every other key alone, in first-seen order."""
    from moelab.models.open import _LAYER_RE

    groups: dict[str, list[str]] = {}
    for k in keys:
        m = _LAYER_RE.match(k)
        groups.setdefault(m.group(0) if m else k, []).append(k)
    return list(groups.values())


def saved_layout(model: nn.Module) -> Layout:
    """Every tensor ``save_pretrained`` would write for ``model`` (on the meta device or not), by
    saved name: ``(dtype, shape)``. Nothing is allocated for a meta model."""
    state = {k: (v if v.is_meta else v.to("meta")) for k, v in savable_state(model).items()}
    return {k: (v.dtype, tuple(v.shape)) for k, v in revert_names(model, state).items()}


class _Writer:
    """``with`` a writer: ``close()`` (checked complete) on success, ``abort()`` on an exception."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):  # noqa: ANN204 - the subclass
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(_Writer):
    """One safetensors file of ``layout`` at ``path``, written tensor by tensor (see the module
    docstring). Use as a context manager; a file left incomplete raises CheckpointError on close."""

    def __init__(self, path: str | os.PathLike, layout: Layout,
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        bad = [n for n, (dt, _) in layout.items() if dt not in _NAMES]
        if bad:
            raise MoelabError(f"{self.path}: tensor {bad[0]!r} has dtype {layout[bad[0]][0]}, which "
                              f"safetensors cannot store")
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.layout, self._ranges, pos = dict(layout), {}, 0
        for name, (dt, shape) in layout.items():
            n = _nbytes(dt, shape)
            header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self._ranges[name] = (pos, n)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._data_start = 8 + len(raw)
        self.size = self._data_start + pos
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.size)
        os.pwrite(self._fd, len(raw).to_bytes(8, "little") + raw, 0)
        self._done: set[str] = set()

    def write(self, name: str, t: Tensor) -> None:
        """Write tensor ``name`` of the layout (its dtype and shape exactly)."""
        if name not in self.layout:
            raise MoelabError(f"{self.path}: {name!r} is not a tensor of this checkpoint's layout")
        if name in self._done:
            raise MoelabError(f"{self.path}: {name!r} was already written")
        dt, shape = self.layout[name]
        if t.dtype != dt or tuple(t.shape) != shape:
            raise MoelabError(f"{self.path}: {name!r} is {t.dtype} {list(t.shape)}, the layout says "
                              f"{dt} {list(shape)}")
        start, n = self._ranges[name]
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        written = 0
        while written < n:  # pwrite may write less than asked for large buffers
            written += os.pwrite(self._fd, data[written:], self._data_start + start + written)
        self._done.add(name)

    def write_model_chunk(self, model: nn.Module, chunk: dict[str, Tensor]) -> None:
        """Write the model tensors ``chunk`` (model keys) under their saved names (:func:`revert_names`)."""
        for name, t in revert_names(model, chunk).items():
            self.write(name, t)

    def close(self) -> None:
        if self._fd < 0:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        missing = [n for n in self.layout if n not in self._done]
        if missing:
            raise CheckpointError(f"{self.path}: incomplete: {len(missing)} tensors were not written "
                                  f"(first: {missing[0]!r})")

    def abort(self) -> None:
        """Close without the completeness check (the caller discards the file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1



SHARD_BYTES = 50 * 10**9  # save_pretrained's default max_shard_size ("50GB") in transformers 5
INDEX_NAME = "model.safetensors.index.json"
# byte units as the hub reads them: GB = 10**9, GiB = 2**30
SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
              "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def size_parts(text: str, percent: bool = False) -> tuple[float, str] | None:
    """``"1.5 GiB" -> (1.5, "gib")``: a number and a unit of :data:`SIZE_UNITS` (or ``"%"`` with
    ``percent``); None when ``text`` is not such a size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*|%)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or not (unit in SIZE_UNITS or (percent and unit == "%")):
        return None
    return float(m.group(1)), unit


def parse_size(size: int | str, what: str) -> int:
    """Bytes of ``size``: an int, or a string like ``"5GB"`` or ``"500MiB"`` (GB = 10**9 as the hub
    counts, GiB = 2**30); a MoelabError naming ``what`` otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        parts = size_parts(size) if isinstance(size, str) else None
        if parts is None:
            raise MoelabError(f"{what}: cannot read {size!r}; expected a number of bytes or a size like "
                              "'5GB' or '500MiB'")
        value = int(parts[0] * SIZE_UNITS[parts[1]])
    if value < 1:
        raise MoelabError(f"{what}: expected at least one byte, got {size!r}")
    return value


def shard_layout(layout: Layout, max_shard_bytes: int = SHARD_BYTES) -> list[Layout]:
    """``layout`` cut in order into shards of at most ``max_shard_bytes`` of tensor data, by
    huggingface_hub's rule (``split_torch_state_dict_into_shards``, what ``save_pretrained`` uses): a
    tensor that would overflow the current shard starts the next; one bigger than the limit gets a
    shard of its own. (The hub also keeps tensors sharing one storage together, so its cut of a
    model whose saved tensors are views of one parameter can differ; both load the same.)"""
    if max_shard_bytes < 1:
        raise MoelabError(f"max_shard_bytes: expected a positive number of bytes, got {max_shard_bytes}")
    shards: list[Layout] = []
    current: Layout = {}
    used = 0
    for name, (dt, shape) in layout.items():
        n = _nbytes(dt, shape)
        if n > max_shard_bytes:
            shards.append({name: (dt, shape)})
            continue
        if current and used + n > max_shard_bytes:
            shards.append(current)
            current, used = {}, 0
        current[name] = (dt, shape)
        used += n
    return [*shards, current] if current or not shards else shards


class ShardedWriter(_Writer):
    """A checkpoint of ``layout`` in ``directory``, as ``save_pretrained`` lays it out: one
    ``model.safetensors``, or shards ``model-0000i-of-0000N.safetensors`` of at most
    ``max_shard_bytes`` with ``model.safetensors.index.json`` (``total_size``, ``weight_map``).
    The same calls as :class:`SafetensorsWriter` (each tensor goes to its shard's file)."""

    def __init__(self, directory: str | os.PathLike, layout: Layout,
                 max_shard_bytes: int = SHARD_BYTES) -> None:
        self.directory = Path(directory)
        shards = shard_layout(layout, max_shard_bytes)
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.writers: list[SafetensorsWriter] = []
        try:
            for file, part in zip(names, shards, strict=True):
                self.writers.append(SafetensorsWriter(self.directory / file, part))
        except BaseException:
            self.abort()
            raise
        self._of = {name: w for w in self.writers for name in w.layout}
        if n > 1:
            index = {"metadata": {"total_size": sum(_nbytes(*v) for v in layout.values())},
                     "weight_map": {name: w.path.name for name, w in self._of.items()}}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def write(self, name: str, t: Tensor) -> None:
        w = self._of.get(name)
        if w is None:
            raise MoelabError(f"{self.directory}: {name!r} is not a tensor of this checkpoint's layout")
        w.write(name, t)

    def write_model_chunk(self, model: nn.Module, chunk: dict[str, Tensor]) -> None:
        """As :meth:`SafetensorsWriter.write_model_chunk`."""
        for name, t in revert_names(model, chunk).items():
            self.write(name, t)

    def close(self) -> None:
        for w in self.writers:
            w.close()

    def abort(self) -> None:
        for w in self.writers:
            w.abort()



def _nbytes(dt: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dt.itemsize
    for s in shape:
        n *= s
    return n


def save_config_files(model: nn.Module, directory: str | os.PathLike) -> None:
    """``config.json`` (and ``generation_config.json`` for a generative model) as ``save_pretrained``
    writes them: the config's ``dtype`` and ``architectures`` set from the model."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


__all__ = ["INDEX_NAME", "SAFETENSORS_DTYPES", "SHARD_BYTES", "Layout", "SafetensorsWriter", "ShardedWriter",
           "layer_chunks", "revert_names", "save_config_files", "saved_layout", "savable_state", "shard_layout"]
