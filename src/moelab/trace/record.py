"""``moelab.trace.record``: run a model over a corpus and store what every router did.

Shape legend: N tokens, S sequences, B batch (sequences), T = B x seq_len tokens of a batch,
L MoE layers, K top-k, E experts.

Steps:
1. the corpus (a path, texts, documents or token ids) is tokenized and packed into sequences;
2. the sequences are cut into shards of about ``shard_tokens`` tokens (whole sequences);
3. the output directory is checked: a trace with the same identity (model fingerprint, tokenizer,
   corpus fingerprint, record settings) is resumed, keeping its valid shards; anything else is
   refused unless ``overwrite``;
4. each missing shard is recorded in batches (no gradient, eval mode, routing hooks of the model
   view), written atomically, and added to the manifest; the hooks come off on exit or error.

A shard depends only on its own sequences, so a resumed run writes the same bytes as an
uninterrupted one. A KeyboardInterrupt while recording comes out as :class:`TraceInterrupted`
(still a KeyboardInterrupt), which says how much of the trace is safely stored.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moelab import __version__
from moelab.errors import TraceError
from moelab.run.runner import evaluating
from moelab.trace.collect import Collector
from moelab.trace.fingerprint import describe_differences, model_fingerprint
from moelab.trace.inputs import CorpusInput, prepare_input
from moelab.trace.progress import token_progress
from moelab.trace.reader import Trace, open_trace
from moelab.trace.schema import (
    MANIFEST_NAME,
    OPTIONAL_FIELDS,
    SHARD_PATTERN,
    WEIGHT_DTYPES,
    LayerInfo,
    Manifest,
    ShardInfo,
    arrow_schema,
)
from moelab.trace.store import (
    check_shard,
    read_manifest,
    remove_trace_files,
    write_manifest,
    write_shard,
)


class TraceInterrupted(KeyboardInterrupt):
    """Ctrl-C (or any KeyboardInterrupt) during recording. ``tokens`` of ``total`` are stored in
    complete shards in ``out_dir``; recording again with the same arguments resumes after them."""

    def __init__(self, out_dir: Path, tokens: int, total: int) -> None:
        super().__init__(f"interrupted with {tokens} of {total} tokens recorded in {out_dir}")
        self.out_dir, self.tokens, self.total = out_dir, tokens, total


@dataclass(frozen=True, kw_only=True)
class RecordConfig:
    """Settings of one recording. ``fields`` come from the four optional-field switches."""

    seq_len: int = 512
    batch_size: int = 8
    max_tokens: int | None = None
    logits: bool = False
    expert_norms: bool = False
    act_max: bool = False
    hidden_norm: bool = False
    weights_dtype: str = "float32"
    shard_tokens: int = 1 << 16
    steering: dict[str, Any] | None = None  # the steering file's edits and fingerprint, when steered

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "shard_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise TraceError(f"{name} must be a positive integer, got {value!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise TraceError(f"max_tokens must be a positive integer or None, got {self.max_tokens!r}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise TraceError(f"weights_dtype must be one of {WEIGHT_DTYPES}, got {self.weights_dtype!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in OPTIONAL_FIELDS if getattr(self, f))

    def identity(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "max_tokens": self.max_tokens,
                "fields": list(self.fields), "weights_dtype": self.weights_dtype,
                "shard_tokens": self.shard_tokens, **({"steering": self.steering} if self.steering else {})}


def plan_shards(starts_S1: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Cut sequences into shards: ``(first_seq, end_seq)`` pairs of about ``shard_tokens`` tokens."""
    shards, first = [], 0
    num_seqs = len(starts_S1) - 1
    for s in range(num_seqs):
        if starts_S1[s + 1] - starts_S1[first] >= shard_tokens or s == num_seqs - 1:
            shards.append((first, s + 1))
            first = s + 1
    return shards


def record(model: Any, texts_or_token_ids: Any, out_dir: str | os.PathLike, *,
           seq_len: int = 512, batch_size: int = 8, max_tokens: int | None = None,
           logits: bool = False, expert_norms: bool = False, act_max: bool = False,
           hidden_norm: bool = False, weights_dtype: str = "float32", shard_tokens: int = 1 << 16,
           labels: list[str | None] | None = None, tokenizer: str | os.PathLike | None = None,
           overwrite: bool = False, resume: bool = True, progress: bool = True,
           on_resume: Callable[[int, int], None] | None = None,
           steering: str | os.PathLike | None = None, expert_budget: int | float | str | None = None,
           policy: str = "lru") -> Trace:
    """Record the routing of every MoE layer of ``model`` over a corpus into ``out_dir``.

    Args:
        model: a transformers MoE model, its :class:`moelab.models.ModelView`, or a checkpoint dir.
        texts_or_token_ids: a corpus path (``Path``: text file, folder, JSONL), a list of texts, of
            :class:`Document`, or of token-id lists, or a 2-D int array/tensor (one row a document).
        out_dir: the trace directory (created if needed).
        seq_len, max_tokens: sequence length of the packing; stop after this many tokens.
        logits, expert_norms, act_max, hidden_norm: optional per-layer fields (see the format doc).
        weights_dtype: ``float32`` (exact) or ``float16`` for the weight columns.
        labels: one label per text or token-id document (ignored for paths and Documents).
        tokenizer: directory holding ``tokenizer.json``; default: the model's directory.
        overwrite: replace a different trace in ``out_dir``; resume: keep the valid shards of an
            interrupted run with the same identity (False: start over, which needs ``overwrite``).
        on_resume: called as ``on_resume(tokens_already_recorded, total_tokens)`` before an
            interrupted run is continued (not for a fresh or an already complete trace).
        steering: a steering file (:func:`moelab.steer.load_steering`) applied while recording, so
            the trace holds the steered routing; its edits go into the trace's identity.
        expert_budget: open the checkpoint ``model`` with its experts offloaded into a cache of this
            many bytes (``"2GiB"``, ``"25%"``, a fraction; see :func:`moelab.offload.offload_model`),
            under cache ``policy``: a model whose experts exceed memory is traced, giving the same
            trace (same identity, so either resumes the other).

    Returns the :class:`Trace`. Raises :class:`TraceError` / :class:`CorpusError` on bad input, and
    :class:`TraceInterrupted` on a KeyboardInterrupt while recording.
    """
    from moelab.offload.outofcore import analysis_view

    with analysis_view(model, expert_budget, policy) as (view, _experts):
        spec = None
        if steering is not None:
            from moelab.steer import load_steering

            spec = load_steering(steering, view)
        cfg = RecordConfig(seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, logits=logits,
                           expert_norms=expert_norms, act_max=act_max, hidden_norm=hidden_norm,
                           weights_dtype=weights_dtype, shard_tokens=shard_tokens,
                           steering=None if spec is None else {"edits": [e.to_dict() for e in spec.edits]})
        data = prepare_input(texts_or_token_ids, view, cfg.seq_len, cfg.max_tokens, labels, tokenizer)
        layers = [LayerInfo(b.layer, b.path, b.num_experts, b.top_k) for b in view.blocks]
        identity = json.loads(json.dumps({
            "model": model_fingerprint(view), "tokenizer": data.tokenizer, "corpus": data.corpus,
            "record": cfg.identity()}))
        shards = plan_shards(data.packed.starts_S1, cfg.shard_tokens)
        manifest = Manifest(identity=identity, layers=layers, label_names=data.packed.label_names,
                            num_tokens=data.packed.num_tokens, num_sequences=data.packed.num_sequences,
                            num_shards=len(shards), moelab_version=__version__)
        out = Path(out_dir)
        manifest.shards = _prepare_out_dir(out, manifest, overwrite=overwrite, resume=resume)
        todo = [i for i in range(len(shards)) if i not in {_shard_index(s) for s in manifest.shards}]
        if todo and manifest.shards and on_resume is not None:
            on_resume(_stored_tokens(manifest), manifest.num_tokens)
        try:
            write_manifest(out, manifest)
            if todo:
                _record_steered(view, spec, data, cfg, manifest, shards, todo, out, progress)
        except KeyboardInterrupt:
            raise TraceInterrupted(out, _stored_tokens(manifest), manifest.num_tokens) from None
        manifest.complete = True
        write_manifest(out, manifest)
        return open_trace(out)


def _stored_tokens(manifest: Manifest) -> int:
    return sum(s.rows for s in manifest.shards)


def _shard_index(shard: ShardInfo) -> int:
    return int(shard.file.split("-")[1].split(".")[0])


def _identity_differences(old: Manifest, new: Manifest) -> list[str]:
    a, b = old.identity, new.identity
    diffs = describe_differences(a["model"], b["model"])
    for key in ("tokenizer", "corpus", "record"):
        if a[key] != b[key]:
            keys = sorted(k for k in set(a[key] or {}) | set(b[key] or {})
                          if (a[key] or {}).get(k) != (b[key] or {}).get(k))
            diffs.append(f"{key} differs ({', '.join(keys)})")
    return diffs


def _prepare_out_dir(out: Path, manifest: Manifest, *, overwrite: bool, resume: bool) -> list[ShardInfo]:
    """Make ``out`` ready; return the shards of an earlier run that can be kept (valid, same identity)."""
    if out.exists() and not out.is_dir():
        raise TraceError(f"out_dir {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST_NAME).is_file():
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if foreign and not overwrite:
            raise TraceError(f"out_dir {out} is not empty and holds no trace ({foreign[:3]}); "
                             "choose an empty directory or pass overwrite (--overwrite)")
        remove_trace_files(out)
        return []
    try:
        old = read_manifest(out)
        diffs = _identity_differences(old, manifest)
    except (TraceError, KeyError, TypeError) as err:
        old, diffs = None, [f"its manifest cannot be used ({err})"]
    if diffs or not resume:
        if not overwrite:
            why = "; ".join(diffs) if diffs else "resume is off"
            raise TraceError(f"out_dir {out} already holds a different trace: {why}; "
                             "pass overwrite (--overwrite) to replace it")
        remove_trace_files(out)
        return []
    keep = []
    for shard in old.shards:
        try:
            check_shard(out, shard, full=True)
            keep.append(shard)
        except TraceError as err:
            _warn(f"{err}; recording it again")
    return sorted(keep, key=_shard_index)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _record_steered(view: Any, spec: Any, *args: Any) -> None:
    """:func:`_record_shards` with the steering spec's edits on the model (removed after)."""
    if spec is None:
        _record_shards(view, *args)
        return
    from moelab.steer import apply_steering

    with apply_steering(view, spec):
        _record_shards(view, *args)


def _record_shards(view: Any, data: CorpusInput, cfg: RecordConfig, manifest: Manifest,
                   shards: list[tuple[int, int]], todo: list[int], out: Path, progress: bool) -> None:
    starts = data.packed.starts_S1
    total = sum(int(starts[shards[i][1]] - starts[shards[i][0]]) for i in todo)
    schema = arrow_schema(manifest.layers, cfg.fields, cfg.weights_dtype, data.packed.labels_S is not None)
    model = view.model
    collector = Collector(view, cfg.fields, cfg.weights_dtype)
    # the one runner's guarantees: eval mode, no grad, the collector's hooks off and the mode restored
    with evaluating(model, [collector]), token_progress(total, enabled=progress) as advance:
        for i in todo:
            first, end = shards[i]
            cols = _record_sequences(model, collector, data, cfg, first, end, advance)
            table = _shard_table(cols, data, first, end, schema)
            info = write_shard(out, SHARD_PATTERN.format(i), table, int(starts[first]), first, end - first)
            manifest.shards = sorted([*manifest.shards, info], key=_shard_index)
            write_manifest(out, manifest)


def _batches(starts_S1: np.ndarray, first: int, end: int, batch_size: int) -> list[tuple[int, int]]:
    """Consecutive runs of at most ``batch_size`` sequences of equal length (no padding needed)."""
    out, s = [], first
    while s < end:
        length = starts_S1[s + 1] - starts_S1[s]
        e = s + 1
        while e < end and e - s < batch_size and starts_S1[e + 1] - starts_S1[e] == length:
            e += 1
        out.append((s, e))
        s = e
    return out


def _record_sequences(model: Any, collector: Collector, data: CorpusInput, cfg: RecordConfig,
                      first: int, end: int, advance: Any) -> dict[str, list[np.ndarray]]:
    """Run sequences ``[first, end)`` through the model; return each column's per-batch pieces."""
    starts, tokens = data.packed.starts_S1, data.packed.tokens_N
    base = getattr(model, "base_model", model)  # the decoder stack: routing needs no LM head
    device = next(model.parameters()).device
    cols: dict[str, list[np.ndarray]] = {}
    for s, e in _batches(starts, first, end, cfg.batch_size):
        ids_BS = torch.from_numpy(tokens[starts[s]:starts[e]].astype(np.int64)).view(e - s, -1)
        base(input_ids=ids_BS.to(device), use_cache=False)
        for name, arr in collector.take(ids_BS.numel()).items():
            cols.setdefault(name, []).append(arr)
        advance(ids_BS.numel())
    return cols


def _shard_table(cols: dict[str, list[np.ndarray]], data: CorpusInput, first: int, end: int,
                 schema: pa.Schema) -> pa.Table:
    """One shard's Arrow table in the schema's column order."""
    packed = data.packed
    starts = packed.starts_S1
    lengths = np.diff(starts[first:end + 1])
    seq_N = np.repeat(np.arange(first, end, dtype=np.int32), lengths)
    pos_N = (np.arange(int(starts[end] - starts[first])) - np.repeat(starts[first:end] - starts[first],
                                                                     lengths)).astype(np.int32)
    arrays: dict[str, pa.Array] = {
        "seq_id": pa.array(seq_N),
        "position": pa.array(pos_N),
        "token_id": pa.array(packed.tokens_N[starts[first]:starts[end]]),
    }
    if packed.labels_S is not None:
        codes = np.repeat(packed.labels_S[first:end], lengths)
        arrays["label"] = pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(packed.label_names))
    for name, pieces in cols.items():
        flat = np.concatenate(pieces)
        if flat.ndim == 2:
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        else:
            arrays[name] = pa.array(flat)
    missing = [f.name for f in schema if f.name not in arrays]
    if missing:
        raise TraceError(f"internal: no data for columns {missing}")
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
