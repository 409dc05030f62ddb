"""``moelab offload bench`` and the library function under it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moelab.cli import main
from moelab.data import default_model
from moelab.errors import MoelabError
from moelab.offload import offload_model
from moelab.offload.runtime import DecodeBenchConfig, decode_bench, stream_ids


def test_decode_bench_counts_what_the_cache_did():
    r = decode_bench(default_model(), DecodeBenchConfig(budget="50%", policy="lfu", tokens=12))
    _, probe = offload_model(default_model(), budget=1.0)
    expert_bytes, layers, k = probe.store.expert_bytes(1), len(probe.view.blocks), probe.view.blocks[0].top_k
    probe.close()
    assert r["hits"] + r["misses"] == 12 * layers * k  # every token's top-k in every MoE layer (distinct)
    assert r["bytes_read"] == r["misses"] * expert_bytes and r["bytes_read_per_token"] == r["bytes_read"] / 12
    assert 0 < r["peak_resident_bytes"] <= r["budget_bytes"] and r["tokens_per_s"] > 0
    with pytest.raises(MoelabError, match="tokens: the corpus holds only 3 tokens, asked for 100"):
        stream_ids(default_model(), ["a b c"], 100)


def test_offload_bench_command(tmp_path):
    out = tmp_path / "bench.json"
    args = ["offload", "bench", "--budget", "0.5", "--tokens", "8", "--json", str(out)]
    res = CliRunner().invoke(main, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "hit rate" in res.output and "peak" in res.output and "decoding" not in res.output
    got = json.loads(out.read_text())
    assert got["tokens"] == 8 and got["policy"] == "lru" and got["hits"] + got["misses"] > 0
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 0 and "decoding" in shown.output
    bad = CliRunner().invoke(main, ["offload", "bench", "--policy", "lur", "--tokens", "4"])
    assert bad.exit_code == 2 and "policy" in bad.output and "Traceback" not in bad.output
    small = CliRunner().invoke(main, ["offload", "bench", "--budget", "1KiB", "--tokens", "4"])
    assert small.exit_code == 2 and "the minimum is" in small.output
