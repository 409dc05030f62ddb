"""moelab.trace: record what every router of an MoE model did over a corpus, into a columnar store.

    trace = moelab.trace.record(model, Path("corpus/"), "out/", seq_len=256, max_tokens=100_000)
    trace = moelab.trace.open("out/")
    ids_NK, w_NK = trace.ids(layer), trace.weights(layer)   # numpy [tokens, top_k]
    trace.select(layers=[3], labels=["code"], tokens=(0, 1000)).ids(3)

The store (Parquet shards + ``manifest.json``) is described in ``docs/trace-format.md`` and reads
with any Parquet reader (pyarrow, polars, DuckDB).
"""

from __future__ import annotations

from moelab.data.texts import CorpusError, Document, read_corpus
from moelab.trace.corpus import TextTokenizer, pack
from moelab.trace.reader import Trace
from moelab.trace.reader import open_trace as open  # noqa: A001 - the documented name
from moelab.trace.record import RecordConfig, TraceInterrupted, record
from moelab.trace.schema import SCHEMA_VERSION, LayerInfo, Manifest

__all__ = [
    "SCHEMA_VERSION", "CorpusError", "Document", "LayerInfo", "Manifest", "RecordConfig", "TextTokenizer",
    "Trace", "TraceInterrupted", "open", "pack", "read_corpus", "record",
]
