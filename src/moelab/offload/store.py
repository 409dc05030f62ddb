"""Expert store: one checkpoint's expert tensors, read by byte offset from its safetensors files.

Shape legend: E experts, r rows per expert of a stacked parameter (1 for ``[E, ...]`` stacks, I for
DBRX's flat ``[E*I, H]``), n experts asked for.

A safetensors file is an 8-byte header length, a JSON header giving each tensor's dtype, shape and
byte range, then the data (row-major, little-endian). The store reads every file's header once
(:func:`moelab.models.checkpoint.read_safetensors_header`, which names a truncated or corrupt file
when the store is opened) and then reads only the bytes of the rows asked for, with ``os.preadv``
straight into the tensor's memory (no file is mapped or loaded whole).

Which checkpoint tensors hold which expert comes from two places, so that no family naming lives
here: the model side is the family adapter's ``ExpertsSpec.params`` (the block's expert parameters,
experts along dim 0); the checkpoint side is transformers' own conversion mapping (the one
``from_pretrained`` applies), which maps a saved name such as
``model.layers.1.block_sparse_moe.experts.3.w1.weight`` to a model parameter
(``model.layers.1.mlp.experts.gate_up_proj``) and says how pieces combine: per-expert tensors
merged along dim 0 and concatenated (``MergeModulelist`` then ``Concatenate``), or a stacked
tensor saved as is (possibly renamed), whose expert e is the row range ``[e r, (e + 1) r)``.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import CheckpointError, UnsupportedModelError
from moelab.models.checkpoint import check_checkpoint_dir, read_safetensors_header
from moelab.models.writer import SAFETENSORS_DTYPES

_DTYPES = SAFETENSORS_DTYPES


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: absolute byte range ``[start, end)`` of its data."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsIndex:
    """Every tensor of a checkpoint directory's ``*.safetensors`` files, read by offset.

    Opening checks each file's header against its size (CheckpointError naming a truncated or
    corrupt file) and that no tensor name is in two files. ``read(name, rows)`` reads rows
    ``[lo, hi)`` of dim 0 (all by default); ``bytes_read`` counts the bytes read so far.
    Thread-safe (``os.preadv`` takes no file position)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        check_checkpoint_dir(self.directory)
        self.entries: dict[str, TensorEntry] = {}
        for file in sorted(self.directory.glob("*.safetensors")):
            header, data_start = read_safetensors_header(file)
            for name, h in header.items():
                if name in self.entries:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} is also in {self.entries[name].file.name}"
                    )
                if h["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {h['dtype']!r}, "
                                          f"which moelab cannot read (known: {sorted(_DTYPES)})")
                lo, hi = (int(x) for x in h["data_offsets"])
                self.entries[name] = TensorEntry(
                    file, _DTYPES[h["dtype"]], tuple(int(s) for s in h["shape"]),
                    data_start + lo, data_start + hi,
                )
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def read(self, name: str, rows: tuple[int, int] | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``[lo, hi)`` of tensor ``name`` (the whole tensor without ``rows``), on the CPU;
        into ``out`` (a contiguous CPU tensor of that shape and dtype) if given."""
        ent = self.entries.get(name)
        if ent is None:
            raise CheckpointError(f"{self.directory}: no tensor {name!r} in its safetensors files")
        shape, offset = ent.shape, ent.start
        if rows is not None:
            lo, hi = rows
            if not shape or not 0 <= lo <= hi <= shape[0]:
                raise CheckpointError(f"{ent.file}: rows {rows} of {name!r} {list(shape)} do not exist")
            row_bytes = (ent.end - ent.start) // max(shape[0], 1)
            shape, offset = (hi - lo, *shape[1:]), ent.start + lo * row_bytes
        if out is None:
            out = torch.empty(shape, dtype=ent.dtype)
        elif (tuple(out.shape) != tuple(shape) or out.dtype != ent.dtype or out.device.type != "cpu"
              or not out.is_contiguous()):
            raise ValueError(f"read {name!r}: out is {out.dtype} {list(out.shape)} on {out.device}; "
                             f"expected a contiguous CPU {ent.dtype} {list(shape)}")
        buf = out.reshape(-1).view(torch.uint8).numpy()
        if buf.size:
            got = os.preadv(self._fd(ent.file), [buf], offset)
            if got != buf.size:
                raise CheckpointError(f"{ent.file}: truncated while reading {name!r} (got {got} of "
                                      f"{buf.size} bytes); save or download it again")
        with self._lock:
            self.bytes_read += buf.size
        return out

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


@dataclass(frozen=True)
class ExpertSource:
    """Where expert e's rows ``[r, ...]`` of one parameter are: checkpoint tensors (whole, or a row
    range of a stacked one), concatenated along ``cat_dim`` of a row when there are several."""

    pieces: tuple[tuple[str, tuple[int, int] | None], ...]
    cat_dim: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertParam:
    """One expert parameter of one MoE block, as the meta model declares it."""

    key: str  # the model's state_dict key
    layer: int
    name: str  # under the block module (ExpertsSpec.params)
    num_experts: int
    shape: tuple[int, ...]  # of the whole parameter, [E * r, ...]
    dtype: torch.dtype


def expert_params(view: Any) -> dict[str, ExpertParam]:
    """The expert parameters of every MoE block of ``view``, by state_dict key (from the families'
    ``ExpertsSpec.params``); UnsupportedModelError for a family that declares none."""
    from moelab.models.backend import spec_for

    out = {}
    for b in view.blocks:
        spec = spec_for(b)
        if not spec.params or spec.from_params is None:
            raise UnsupportedModelError(f"{b.path} ({b.family}): its adapter does not declare its "
                                        f"expert parameters (ExpertsSpec.params), so it cannot be offloaded")
        for name in spec.params:
            p = b.module.get_parameter(name)
            if p.shape[0] % b.num_experts:
                raise UnsupportedModelError(f"{b.path}.{name} {list(p.shape)}: dim 0 is not a "
                                            f"multiple of its {b.num_experts} experts")
            out[f"{b.path}.{name}"] = ExpertParam(f"{b.path}.{name}", b.layer, name, b.num_experts,
                                                  tuple(p.shape), p.dtype)
    return out


class ExpertStore:
    """The experts of ``model`` (built on the meta device) in the checkpoint at ``path``.

    ``read(layer, e) -> {param name: rows [r, ...]}`` in the model's dtype (CPU), read by offset;
    ``expert_bytes(layer)``: bytes of one expert of that layer once read; ``resident``: checkpoint
    name -> model key of every other tensor (loaded once by :func:`moelab.offload.offload_model`).
    CheckpointError when opened if a file is truncated, an expert's tensor is missing or a shape
    contradicts the config.
    """

    def __init__(self, path: str | Path, model: nn.Module, view: Any) -> None:
        self.path = Path(path)
        self.index = SafetensorsIndex(self.path)
        self.params = expert_params(view)
        self.resident: dict[str, str] = {}
        self.sources: dict[tuple[int, str], list[ExpertSource]] = {}
        try:
            self._map(model)
        except BaseException:
            self.index.close()
            raise
        self.layers = sorted({p.layer for p in self.params.values()})
        self._names = {layer: [p.name for p in self.params.values() if p.layer == layer]
                       for layer in self.layers}
        self._bytes = {layer: sum(_row_bytes(p) for p in self.params.values() if p.layer == layer)
                       for layer in self.layers}
        self._read_lock = threading.Lock()
        self._expert_bytes_read = 0

    @property
    def bytes_read(self) -> int:
        """Bytes of expert tensors read so far by :meth:`read` (the index counts all reads)."""
        return self._expert_bytes_read

    def num_experts(self, layer: int) -> int:
        return next(p.num_experts for p in self.params.values() if p.layer == layer)

    def expert_bytes(self, layer: int) -> int:
        """Bytes one expert of ``layer`` takes in memory (all its parameters' rows)."""
        return self._bytes[layer]

    def total_expert_bytes(self) -> int:
        return sum(self._bytes[layer] * self.num_experts(layer) for layer in self.layers)

    def read(self, layer: int, expert: int, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Expert ``expert`` of MoE layer ``layer``: ``{param name: rows [r, ...]}`` (see
        ``ExpertsSpec.params``), each contiguous, in the model parameter's dtype. With ``out``
        (tensors of those shapes, e.g. a cache's slot), written into it: a tensor stored whole, in
        that dtype, is read straight into its destination, without a temporary."""
        if layer not in self._names or not 0 <= expert < self.num_experts(layer):
            raise CheckpointError(f"{self.path}: no expert {expert} in MoE layer {layer}")
        got = {}
        for name in self._names[layer]:
            src = self.sources[(layer, name)][expert]
            dtype = self.params[_key(self.params, layer, name)].dtype
            dst = None if out is None else out[name]
            parts = None if dst is None else self._read_into(src, dst)
            if parts is None:
                parts = [self.index.read(n, rows) for n, rows in src.pieces]
            with self._read_lock:
                self._expert_bytes_read += sum(t.nbytes for t in parts)
            if dst is not None and parts[0].data_ptr() == dst.data_ptr():
                got[name] = dst  # read in place
                continue
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=src.cat_dim)
            t = t.reshape(src.shape).to(dtype)
            got[name] = t.contiguous() if dst is None else dst.copy_(t)
        return got

    def _read_into(self, src: ExpertSource, dst: Tensor) -> list[Tensor] | None:
        """Read ``src``'s pieces straight into ``dst`` where they fill it in order (a contiguous CPU
        tensor of their dtype, pieces concatenated along a dim with only size-1 dims before it,
        e.g. gate then up of one expert); None where they don't (the caller copies)."""
        shapes = []
        for n, rows in src.pieces:
            shape = self.index.entries[n].shape
            shapes.append(tuple(shape) if rows is None else (rows[1] - rows[0], *shape[1:]))
        if (dst.device.type != "cpu" or not dst.is_contiguous()
                or any(self.index.entries[n].dtype != dst.dtype for n, _ in src.pieces)
                or sum(math.prod(s) for s in shapes) != dst.numel()
                or (len(shapes) > 1 and math.prod(shapes[0][:src.cat_dim]) != 1)):
            return None
        flat, at, parts = dst.view(-1), 0, []
        for (n, rows), shape in zip(src.pieces, shapes, strict=True):
            k = math.prod(shape)
            parts.append(self.index.read(n, rows, out=flat[at:at + k].view(shape)))
            at += k
        return parts

    def close(self) -> None:
        self.index.close()

    def _map(self, model: nn.Module) -> None:
        """Sort every checkpoint tensor into ``resident`` or ``sources``; raise on gaps."""
        cm = map_checkpoint(self.index, model)
        state = model.state_dict(keep_vars=True)
        for name, (key, converter, _pattern) in cm.keys.items():
            if key in self.params and converter is None:
                self._stacked(name, self.params[key])
            elif key in state and key not in self.params:
                if converter is not None:
                    raise UnsupportedModelError(f"{key}: transformers merges it from several "
                                                f"checkpoint tensors but it is not an expert parameter")
                self.resident[name] = key
        for key, by_e in cm.pieces.items():
            self._merged(self.params[key], by_e, cm.keys[next(iter(by_e.values()))[0]][1])
        missing = [k for k in self.params if (self.params[k].layer, self.params[k].name) not in self.sources]
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: the safetensors files hold no tensor for the expert "
                                  f"parameter {missing[0]}{more}")
        _check_rest(self.path, model, state, set(self.resident.values()), set(self.params),
                    cm.unexpected)

    def _stacked(self, name: str, p: ExpertParam) -> None:
        r = p.shape[0] // p.num_experts
        row = (r, *p.shape[1:])
        self.sources[(p.layer, p.name)] = [
            ExpertSource(((name, (e * r, (e + 1) * r)),), 0, row) for e in range(p.num_experts)
        ]

    def _merged(self, p: ExpertParam, by_e: dict[int, dict[int, str]], converter: Any) -> None:
        """Per-expert pieces, merged along dim 0 and concatenated along the converter's dim."""
        n_pieces = len(converter.source_patterns)
        row = (p.shape[0] // p.num_experts, *p.shape[1:])
        srcs = []
        for e in range(p.num_experts):
            got = by_e.get(e, {})
            if len(got) != n_pieces:
                want = _missing_name(by_e, converter.source_patterns, min(set(range(n_pieces)) - set(got)), e)
                raise CheckpointError(f"{self.path}: expert {e} of layer {p.layer} is missing from the "
                                      f"safetensors files: no tensor {want!r} (for {p.key})")
            srcs.append(ExpertSource(tuple((got[i], None) for i in range(n_pieces)), _cat_dim(converter), row))
        self.sources[(p.layer, p.name)] = srcs


@dataclass(frozen=True)
class CheckpointMap:
    """How a checkpoint's tensors become the model's (transformers' conversion mapping)."""

    keys: dict[str, tuple[str, Any, str | None]]  # name -> (model key, WeightConverter | None, pattern)
    pieces: dict[str, dict[int, dict[int, str]]]  # merged model key -> expert -> piece -> name
    unexpected: list[str]  # names the model has no place for


def map_checkpoint(index: SafetensorsIndex, model: nn.Module) -> CheckpointMap:
    """Map every tensor of ``index`` to ``model`` (built on the meta device) and check its shape
    against the model's, from the headers only: CheckpointError naming (up to 3) tensors whose
    shapes contradict config.json, UnsupportedModelError for a conversion moelab cannot read."""
    keys = _model_keys(model, list(index.entries))
    state = model.state_dict()
    pieces: dict[str, dict[int, dict[int, str]]] = {}
    unexpected, bad = [], []
    for name, (key, conv, pat) in keys.items():
        if key not in state:
            if not _ignored(model, name):
                unexpected.append(name)
        elif conv is None:
            if index.entries[name].shape != tuple(state[key].shape):
                bad.append((key, index.entries[name].shape, state[key].shape))
        else:
            _converter_ok(key, conv)
            e = _expert_index(name, pat)
            pieces.setdefault(key, {}).setdefault(e, {})[conv.source_patterns.index(pat)] = name
    for key, by_e in pieces.items():
        found = _merged_shape(index, by_e, keys[next(iter(by_e.values()))[0]][1])
        if found != tuple(state[key].shape):
            bad.append((key, found, state[key].shape))
    if bad:
        bad.sort(key=lambda b: b[0])
        told = "; ".join(f"{k} is {list(f)} in the weights but config.json implies {list(w)}"
                         for k, f, w in bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise CheckpointError(f"{index.directory}: config.json contradicts the weights (check "
                              f"num_experts / num_local_experts, intermediate sizes, hidden_size): {told}")
    return CheckpointMap(keys, pieces, unexpected)


def _converter_ok(key: str, converter: Any) -> None:
    ops = [type(op).__name__ for op in converter.operations]
    merge = getattr(converter.operations[0], "dim", None) if ops else None
    if ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) or merge != 0:
        raise UnsupportedModelError(f"{key}: transformers builds it from the checkpoint with "
                                    f"{ops}; moelab's store reads only merged (and concatenated) experts")


def _cat_dim(converter: Any) -> int:
    """The dim of one expert's piece along which the pieces are concatenated."""
    return converter.operations[-1].dim - 1 if len(converter.operations) == 2 else 0


def _merged_shape(index: SafetensorsIndex, by_e: dict[int, dict[int, str]], converter: Any) -> tuple:
    """The shape transformers would build from the pieces: ``[experts, *joined piece]``; an expert
    whose pieces differ from the others' gives its own shapes, so that the mismatch is reported."""
    cat = _cat_dim(converter)
    most = max(by_e, key=lambda e: len(by_e[e]))
    shapes = [index.entries[by_e[most][i]].shape for i in sorted(by_e[most])]
    for got in by_e.values():
        other = [index.entries[got[i]].shape for i in sorted(got)]
        if len(other) == len(shapes) and other != shapes:
            return (len(by_e), *other[0])
    joined = list(shapes[0])
    joined[cat] = sum(s[cat] for s in shapes)
    return (max(by_e) + 1, *joined)


def _row_bytes(p: ExpertParam) -> int:
    n = 1
    for s in p.shape:
        n *= s
    return n // p.num_experts * p.dtype.itemsize


def _key(params: dict[str, ExpertParam], layer: int, name: str) -> str:
    return next(k for k, p in params.items() if p.layer == layer and p.name == name)


def _model_keys(model: nn.Module, names: list[str]) -> dict[str, tuple[str, Any, str | None]]:
    """checkpoint name -> (model key, transformers WeightConverter or None, its matched pattern),
    with transformers' own conversion mapping for ``model`` (what ``from_pretrained`` applies)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix
    out = {}
    for name in names:
        key, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if key not in meta and name in meta:  # as transformers does: keep the name, fix the prefix
            key, pattern = rename_source_key(name, [], [], prefix, meta)
        conv = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
        out[name] = (key, conv, pattern)
    return out


def _pattern_regex(pattern: str) -> str:
    return re.escape(pattern).replace(r"\*", r"(\d+)")


def _expert_index(name: str, pattern: str) -> int:
    m = re.search(_pattern_regex(pattern), name)
    if m is None:
        raise UnsupportedModelError(f"{name}: cannot tell its expert index from transformers' "
                                    f"pattern {pattern!r}")
    return int(m.group(1))


def _missing_name(by_e: dict[int, dict[int, str]], patterns: list[str], piece: int, e: int) -> str:
    """The name piece ``piece`` of expert ``e`` would have: another expert's, with e put in."""
    pat = patterns[piece]
    other = next((d[piece] for d in by_e.values() if piece in d), None)
    if other is None:
        return pat.replace("*", str(e))
    return re.sub(_pattern_regex(pat), lambda _m: pat.replace("*", str(e)), other, count=1)


def _ignored(model: nn.Module, name: str) -> bool:
    pats = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return "rotary_emb.inv_freq" in name or any(re.search(p, name) for p in pats)


def _check_rest(path: Path, model: nn.Module, state: dict, loaded: set[str], experts: set[str],
                unexpected: list[str]) -> None:
    """CheckpointError for model tensors the checkpoint lacks (tied and non-persistent aside) or
    checkpoint tensors the model has no place for."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(k for k in state if k not in loaded and k not in experts and k not in tied)
    problems = []
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        problems.append("missing: " + ", ".join(missing[:3]) + more)
    if unexpected:
        problems.append("unexpected: " + ", ".join(sorted(unexpected)[:3]))
    if problems:
        raise CheckpointError(f"{path}: config.json contradicts the weights: " + "; ".join(problems))
