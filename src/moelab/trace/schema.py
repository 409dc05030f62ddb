"""The routing-trace store format: column names, Arrow schema, and the manifest.

Shape legend: N tokens (rows), L MoE layers, K top-k slots, E experts.

One row per token. Fixed columns ``seq_id``, ``position``, ``token_id`` (int32) and an optional
``label`` (dictionary-encoded string). Per MoE layer ``i`` (the model's decoder-layer index):

- ``ids_l{i}``: fixed_size_list<int16>[K], the chosen experts; ``-1`` marks a slot routed nowhere.
- ``weights_l{i}``: fixed_size_list<float32 | float16>[K], the final combine weights.
- optional ``logits_l{i}`` [E] float16, ``expert_norm_l{i}`` [K] float32, ``act_in_max_l{i}`` and
  ``act_out_max_l{i}`` [K] float32, ``hidden_norm_l{i}`` float32.

The full description, for readers in any language, is ``docs/trace-format.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from moelab.errors import TraceError

FORMAT_NAME = "moelab-trace"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.parquet"

# optional per-layer field -> the columns it adds (as name prefixes)
OPTIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "logits": ("logits",),
    "expert_norms": ("expert_norm",),
    "act_max": ("act_in_max", "act_out_max"),
    "hidden_norm": ("hidden_norm",),
}
WEIGHT_DTYPES = ("float32", "float16")


def column(prefix: str, layer: int) -> str:
    """Column name of a per-layer field, e.g. ``column("ids", 3) == "ids_l3"``."""
    return f"{prefix}_l{layer}"


@dataclass(frozen=True)
class LayerInfo:
    """One MoE layer of the traced model: decoder-layer index, module path, E and K."""

    layer: int
    path: str
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        if self.layer < 0 or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise TraceError(f"invalid MoE layer description {self}")
        if self.num_experts > 32767:
            raise TraceError(f"layer {self.layer}: {self.num_experts} experts do not fit int16 ids")


def arrow_schema(layers: list[LayerInfo], fields: tuple[str, ...], weights_dtype: str,
                 with_labels: bool) -> pa.Schema:
    """The Arrow schema of every shard of a trace with these layers and optional fields."""
    wtype = pa.float32() if weights_dtype == "float32" else pa.float16()
    cols = [
        pa.field("seq_id", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
    ]
    if with_labels:
        cols.append(pa.field("label", pa.dictionary(pa.int32(), pa.string()), nullable=False))
    for info in layers:
        k, e, i = info.top_k, info.num_experts, info.layer
        cols.append(pa.field(column("ids", i), pa.list_(pa.int16(), k), nullable=False))
        cols.append(pa.field(column("weights", i), pa.list_(wtype, k), nullable=False))
        if "logits" in fields:
            cols.append(pa.field(column("logits", i), pa.list_(pa.float16(), e), nullable=False))
        if "expert_norms" in fields:
            cols.append(pa.field(column("expert_norm", i), pa.list_(pa.float32(), k), nullable=False))
        if "act_max" in fields:
            for name in OPTIONAL_FIELDS["act_max"]:
                cols.append(pa.field(column(name, i), pa.list_(pa.float32(), k), nullable=False))
        if "hidden_norm" in fields:
            cols.append(pa.field(column("hidden_norm", i), pa.float32(), nullable=False))
    return pa.schema(cols)


@dataclass
class ShardInfo:
    """One complete Parquet shard: rows ``[first_row, first_row + rows)`` of the trace."""

    file: str
    first_row: int
    rows: int
    first_seq: int
    num_seqs: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """Contents of ``manifest.json``. ``identity`` is what must agree for a run to resume.

    ``identity`` holds ``model`` (fingerprint), ``tokenizer``, ``corpus`` (fingerprint) and
    ``record`` (seq_len, max_tokens, fields, weights_dtype, batch_size, shard_tokens).
    """

    identity: dict[str, Any]
    layers: list[LayerInfo]
    label_names: list[str] | None
    num_tokens: int
    num_sequences: int
    num_shards: int
    shards: list[ShardInfo] = field(default_factory=list)
    moelab_version: str = ""
    complete: bool = False

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.identity["record"]["fields"])

    @property
    def weights_dtype(self) -> str:
        return self.identity["record"]["weights_dtype"]

    def schema(self) -> pa.Schema:
        return arrow_schema(self.layers, self.fields, self.weights_dtype, self.label_names is not None)

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "moelab_version": self.moelab_version,
            "complete": self.complete,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
            "num_shards": self.num_shards,
            "label_names": self.label_names,
            "layers": [vars(x) for x in self.layers],
            **self.identity,
            "shards": [vars(s) for s in self.shards],
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse a manifest; ``where`` names the file in error messages."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise TraceError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise TraceError(f"{where}: not a moelab trace manifest (field 'format' != {FORMAT_NAME!r})")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TraceError(
                f"{where}: schema_version {version!r}, this moelab reads version {SCHEMA_VERSION}"
            )
        try:
            return cls(
                identity={k: doc[k] for k in ("model", "tokenizer", "corpus", "record")},
                layers=[LayerInfo(**x) for x in doc["layers"]],
                label_names=doc["label_names"],
                num_tokens=int(doc["num_tokens"]),
                num_sequences=int(doc["num_sequences"]),
                num_shards=int(doc["num_shards"]),
                shards=[ShardInfo(**s) for s in doc["shards"]],
                moelab_version=str(doc["moelab_version"]),
                complete=bool(doc["complete"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise TraceError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None
