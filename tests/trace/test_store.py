"""The store: shapes and dtypes, zero-copy reads, selection, other readers, corruption detection."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import polars as pl
import pytest

import moelab.trace
from moelab.errors import TraceError


def test_arrays_have_the_documented_shapes_and_dtypes(full_trace):
    t = full_trace
    n = t.num_tokens
    assert n == 300 and t.layers == [0, 1] and t.manifest.num_shards > 3
    assert t.label_names == ["code", "drama", "prose"]
    for layer in t.layers:
        info = t.layer_info(layer)
        assert (info.num_experts, info.top_k) == (8, 2)
        assert t.ids(layer).shape == (n, 2) and t.ids(layer).dtype == np.int16
        assert t.weights(layer).dtype == np.float32 and t.logits(layer).shape == (n, 8)
        assert t.logits(layer).dtype == np.float16 and t.hidden_norm(layer).shape == (n,)
        for get in (t.expert_norms, t.act_in_max, t.act_out_max):
            assert get(layer).shape == (n, 2) and get(layer).dtype == np.float32
        assert (t.ids(layer) >= 0).all() and (t.ids(layer) < 8).all()
        np.testing.assert_allclose(t.weights(layer).sum(1), 1.0, rtol=1e-5)  # norm_topk_prob
    seq, pos = t.seq_ids, t.positions
    assert (np.diff(seq) >= 0).all()
    starts = np.flatnonzero(np.diff(seq, prepend=-1))
    assert (pos[starts] == 0).all()
    assert (np.diff(pos)[np.diff(seq) == 0] == 1).all()
    assert t.labels.dtype == np.int32 and set(np.unique(t.labels)) == {0, 1, 2}


def test_read_within_one_shard_is_zero_copy(full_trace):
    first = full_trace.manifest.shards[0].rows
    part = full_trace.select(tokens=(2, first - 1))
    for arr in (part.ids(0), part.weights(1), part.token_ids, part.logits(0), part.hidden_norm(0)):
        assert not arr.flags.owndata  # a view on Arrow's buffer
    np.testing.assert_array_equal(part.ids(0), full_trace.ids(0)[2:first - 1])


def test_selection_by_layers_labels_and_tokens(full_trace):
    t = full_trace
    only1 = t.select(layers=[1])
    assert only1.layers == [1]
    with pytest.raises(TraceError, match="not in this selection"):
        only1.ids(0)
    with pytest.raises(TraceError, match="not an MoE layer"):
        t.select(layers=[7])
    lab = t.labels
    drama = t.select(labels=["drama"])
    mask = lab == 1
    np.testing.assert_array_equal(drama.ids(0), t.ids(0)[mask])
    np.testing.assert_array_equal(drama.token_ids, t.token_ids[mask])
    # a token range of the label selection counts tokens of that selection
    sub = drama.select(tokens=slice(3, 40))
    np.testing.assert_array_equal(sub.weights(1), t.weights(1)[mask][3:40])
    rng = t.select(tokens=range(50, 250)).select(labels=["code", "prose"])
    idx = np.arange(50, 250)[np.isin(lab[50:250], [0, 2])]
    np.testing.assert_array_equal(rng.act_out_max(0), t.act_out_max(0)[idx])
    assert t.select(tokens=(290, 400)).num_tokens == 10 and t.select(tokens=(5, 5)).ids(0).shape == (0, 2)
    with pytest.raises(TraceError, match="not in this trace"):
        t.select(labels=["poetry"])


def test_polars_and_duckdb_read_the_same_store(full_trace):
    t = full_trace
    glob = str(t.directory / "*.parquet")
    df = pl.read_parquet(glob).sort(["seq_id", "position"])
    np.testing.assert_array_equal(df["ids_l1"].to_numpy(), t.ids(1))
    np.testing.assert_array_equal(df["weights_l0"].to_numpy(), t.weights(0))
    assert df["label"].cast(pl.Utf8).to_list() == [t.label_names[c] for c in t.labels]
    counts = duckdb.sql(
        f"SELECT e, count(*) AS n FROM (SELECT unnest(ids_l0) AS e FROM read_parquet('{glob}')) "
        "GROUP BY e ORDER BY e").fetchall()
    want = np.bincount(t.ids(0).reshape(-1), minlength=8)
    assert {int(e): int(n) for e, n in counts} == {e: int(c) for e, c in enumerate(want) if c}


def test_missing_optional_field_says_which_flag(model_dir, corpus_dir, tmp_path):
    t = moelab.trace.record(str(model_dir), corpus_dir, tmp_path, seq_len=16, max_tokens=40, progress=False)
    assert t.fields == ()
    with pytest.raises(TraceError, match="--act-max"):
        t.act_in_max(0)
    with pytest.raises(TraceError, match="--logits"):
        t.logits(0)


@pytest.fixture
def trace_copy(full_trace, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(full_trace.directory, dst)
    return dst


def test_truncated_shard_is_detected_and_named(trace_copy):
    victim = trace_copy / "shard-00001.parquet"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"shard-00001\.parquet is truncated"):
        moelab.trace.open(trace_copy)
    victim.unlink()
    with pytest.raises(TraceError, match=r"shard-00001\.parquet is missing"):
        moelab.trace.open(trace_copy)


def test_corrupt_shard_of_the_same_size_is_detected(trace_copy):
    victim = trace_copy / "shard-00002.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"shard-00002\.parquet is corrupt"):
        moelab.trace.open(trace_copy, verify=True)
    t = moelab.trace.open(trace_copy)  # quick checks pass; the page checksums catch it on read
    with pytest.raises(TraceError, match=r"shard-00002\.parquet cannot be read"):
        for layer in t.layers:
            for name in ("ids", "weights", "logits", "expert_norms", "act_in_max", "act_out_max"):
                getattr(t, name)(layer)
            t.hidden_norm(layer)
        t.token_ids, t.seq_ids, t.positions, t.labels  # noqa: B018


def test_manifest_errors(trace_copy):
    path = trace_copy / "manifest.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "schema_version": 99}))
    with pytest.raises(TraceError, match="schema_version 99"):
        moelab.trace.open(trace_copy)
    path.write_text(json.dumps({**doc, "complete": False}))
    with pytest.raises(TraceError, match="incomplete"):
        moelab.trace.open(trace_copy)
    path.write_text("{")
    with pytest.raises(TraceError, match="not valid JSON"):
        moelab.trace.open(trace_copy)
    path.unlink()
    with pytest.raises(TraceError, match="no manifest.json"):
        moelab.trace.open(trace_copy)
