"""Reading a routing trace as numpy arrays: ``moelab.trace.open(dir)``.

Shape legend: N tokens (selected rows), K top-k slots, E experts.

Arrays come straight from Arrow buffers (no copy) when the selection lies in one shard and no
label filter applies; otherwise the shards' pieces are concatenated once. Each call reads from disk;
keep the array you need instead of calling again in a loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moelab.errors import TraceError
from moelab.trace.schema import LayerInfo, Manifest, column
from moelab.trace.store import check_shard, chunk_to_numpy, read_manifest, read_shard_columns

_FLAGS = {"logits": "--logits", "expert_norms": "--expert-norms", "act_max": "--act-max",
          "hidden_norm": "--hidden-norm"}


@dataclass(frozen=True)
class _Rows:
    """Selected rows: the global range ``[start, stop)``, optionally narrowed to ``index`` within it."""

    start: int
    stop: int
    index: np.ndarray | None = None  # sorted offsets relative to start

    @property
    def count(self) -> int:
        return self.stop - self.start if self.index is None else len(self.index)


class Trace:
    """A routing trace on disk. Get one with :func:`open_trace` (``moelab.trace.open``)."""

    def __init__(self, directory: Path, manifest: Manifest, layers: list[int], rows: _Rows):
        self.directory = directory
        self.manifest = manifest
        self.layers = layers
        self._rows = rows
        self._info = {x.layer: x for x in manifest.layers}

    def __repr__(self) -> str:
        return (f"Trace({str(self.directory)!r}, tokens={self.num_tokens}, layers={self.layers}, "
                f"fields={list(self.fields)})")

    # ---- description -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self._rows.count

    @property
    def fields(self) -> tuple[str, ...]:
        """Optional fields recorded (``logits``, ``expert_norms``, ``act_max``, ``hidden_norm``)."""
        return self.manifest.fields

    @property
    def label_names(self) -> list[str] | None:
        """Names of the label codes returned by :attr:`labels`; None if the trace has no labels."""
        return self.manifest.label_names

    def layer_info(self, layer: int) -> LayerInfo:
        """Module path, ``num_experts`` and ``top_k`` of a traced MoE layer."""
        self._check_layer(layer)
        return self._info[layer]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.directory / s.file for s in self.manifest.shards]

    # ---- per-token columns -------------------------------------------------------------------
    @property
    def token_ids(self) -> np.ndarray:
        """``[N]`` int32 token ids."""
        return self._read("token_id", None)

    @property
    def seq_ids(self) -> np.ndarray:
        """``[N]`` int32 sequence ids (packed sequences, numbered from 0 in corpus order)."""
        return self._read("seq_id", None)

    @property
    def positions(self) -> np.ndarray:
        """``[N]`` int32 position of each token in its sequence."""
        return self._read("position", None)

    @property
    def labels(self) -> np.ndarray | None:
        """``[N]`` int32 label codes indexing :attr:`label_names`, or None without labels."""
        if self.label_names is None:
            return None
        return self._read("label", None)

    # ---- per-layer columns -------------------------------------------------------------------
    def ids(self, layer: int) -> np.ndarray:
        """``[N, K]`` int16 chosen experts of ``layer``; ``-1`` = slot routed to no expert."""
        return self._layer_column("ids", layer, None)

    def weights(self, layer: int) -> np.ndarray:
        """``[N, K]`` final combine weights (float32 or float16), aligned with :meth:`ids`."""
        return self._layer_column("weights", layer, None)

    def logits(self, layer: int) -> np.ndarray:
        """``[N, E]`` float16 router logits (recorded with ``--logits``)."""
        return self._layer_column("logits", layer, "logits")

    def expert_norms(self, layer: int) -> np.ndarray:
        """``[N, K]`` float32 L2 norm of each chosen expert's output, before weighting."""
        return self._layer_column("expert_norm", layer, "expert_norms")

    def act_in_max(self, layer: int) -> np.ndarray:
        """``[N, K]`` float32 max |activation| entering each chosen expert's down-projection."""
        return self._layer_column("act_in_max", layer, "act_max")

    def act_out_max(self, layer: int) -> np.ndarray:
        """``[N, K]`` float32 max |activation| leaving each chosen expert's down-projection."""
        return self._layer_column("act_out_max", layer, "act_max")

    def hidden_norm(self, layer: int) -> np.ndarray:
        """``[N]`` float32 L2 norm of the hidden state entering the MoE block."""
        return self._layer_column("hidden_norm", layer, "hidden_norm")

    # ---- selection ---------------------------------------------------------------------------
    def select(self, *, layers: Iterable[int] | None = None, labels: Iterable[str] | None = None,
               tokens: slice | range | tuple[int, int] | None = None) -> Trace:
        """A narrower view: some layers, the tokens of some labels, a token range (in this view)."""
        keep = self.layers if layers is None else [int(x) for x in layers]
        for layer in keep:
            self._check_layer(layer)
        rows = self._rows if tokens is None else self._slice_rows(tokens)
        out = Trace(self.directory, self.manifest, keep, rows)
        if labels is not None:
            out = out._filter_labels(list(labels))
        return out

    def _slice_rows(self, tokens: slice | range | tuple[int, int]) -> _Rows:
        if isinstance(tokens, tuple):
            tokens = slice(*tokens)
        if isinstance(tokens, range):
            if tokens.step != 1:
                raise TraceError(f"tokens: only step 1 is supported, got {tokens}")
            tokens = slice(tokens.start, tokens.stop)
        if not isinstance(tokens, slice) or tokens.step not in (None, 1):
            raise TraceError(f"tokens must be a slice, range or (start, stop) with step 1, got {tokens!r}")
        lo, hi, _ = tokens.indices(self.num_tokens)
        hi = max(lo, hi)
        r = self._rows
        if r.index is None:
            return _Rows(r.start + lo, r.start + hi)
        return _Rows(r.start, r.stop, r.index[lo:hi])

    def _filter_labels(self, names: list[str]) -> Trace:
        if self.label_names is None:
            raise TraceError(f"{self.directory}: this trace has no labels to select by")
        unknown = [n for n in names if n not in self.label_names]
        if unknown:
            raise TraceError(f"labels {unknown} are not in this trace; it has {self.label_names}")
        codes = [self.label_names.index(n) for n in names]
        hit = np.flatnonzero(np.isin(self.labels, codes))
        r = self._rows
        base = np.arange(r.stop - r.start) if r.index is None else r.index
        return Trace(self.directory, self.manifest, self.layers, _Rows(r.start, r.stop, base[hit]))

    # ---- integrity and matching -------------------------------------------------------------
    def verify(self) -> None:
        """Hash every shard and compare with the manifest; raise :class:`TraceError` naming a bad file."""
        for shard in self.manifest.shards:
            check_shard(self.directory, shard, full=True)

    def check_matches(self, model: Any) -> None:
        """Raise :class:`TraceError` saying what differs if ``model`` is not the traced model."""
        from moelab.trace.fingerprint import compare_model

        compare_model(self.manifest.identity["model"], model, str(self.directory))

    # ---- reading -----------------------------------------------------------------------------
    def _check_layer(self, layer: int) -> None:
        if layer not in self._info:
            raise TraceError(f"layer {layer} is not an MoE layer of this trace; traced layers: "
                             f"{sorted(self._info)}")
        if layer not in self.layers:
            raise TraceError(f"layer {layer} is not in this selection (layers {self.layers})")

    def _layer_column(self, prefix: str, layer: int, field: str | None) -> np.ndarray:
        self._check_layer(layer)
        if field is not None and field not in self.fields:
            raise TraceError(f"this trace has no {field!r} field; record it with `moelab trace "
                             f"{_FLAGS[field]}`")
        info = self._info[layer]
        width = {"ids": info.top_k, "weights": info.top_k, "logits": info.num_experts,
                 "hidden_norm": None}.get(prefix, info.top_k)
        return self._read(column(prefix, layer), width)

    def _read(self, name: str, width: int | None) -> np.ndarray:
        r = self._rows
        pieces: list[np.ndarray] = []
        for shard in self.manifest.shards:
            lo = max(r.start, shard.first_row)
            hi = min(r.stop, shard.first_row + shard.rows)
            if lo >= hi:
                continue
            col = read_shard_columns(self.directory, shard, [name]).column(0)
            col = col.slice(lo - shard.first_row, hi - lo)
            pieces += [self._to_numpy(chunk, width) for chunk in col.chunks if len(chunk)]
        if not pieces:
            shape = (0,) if width is None else (0, width)
            return np.empty(shape, dtype=self._empty_dtype(name))
        out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return out if r.index is None else out[r.index]

    def _to_numpy(self, chunk: pa.Array, width: int | None) -> np.ndarray:
        if isinstance(chunk, pa.DictionaryArray):  # label: map each shard's dictionary to manifest codes
            names = self.label_names or []
            lookup = np.array([names.index(s) for s in chunk.dictionary.to_pylist()], dtype=np.int32)
            return lookup[chunk.indices.to_numpy(zero_copy_only=False)]
        return chunk_to_numpy(chunk, width)

    def _empty_dtype(self, name: str) -> np.dtype:
        field = self.manifest.schema().field(name).type
        while hasattr(field, "value_type"):
            field = field.value_type
        return np.int32 if pa.types.is_dictionary(field) else field.to_pandas_dtype()


def open_trace(directory: str | Path, *, verify: bool = False) -> Trace:
    """Open a complete trace directory. Quick checks always (size, footer, row count of every
    shard); ``verify=True`` also hashes every shard. Raises :class:`TraceError` naming a bad file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest.complete:
        raise TraceError(
            f"{directory}: trace is incomplete ({len(manifest.shards)} of {manifest.num_shards} "
            "shards); run the same `moelab trace` command again to resume it"
        )
    for shard in manifest.shards:
        check_shard(directory, shard, full=verify)
    layers = [x.layer for x in manifest.layers]
    return Trace(directory, manifest, layers, _Rows(0, manifest.num_tokens))
