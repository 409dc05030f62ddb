"""Out-of-core analysis: writing a plan layer by layer (from memory or from the safetensors by offset),
tracing and calibrating with offloaded experts: each equal to the in-memory path's output."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moelab.compress.apply import apply_plan, save_compressed
from moelab.compress.plan import LayerPlan, Member, OutExpert, Plan
from moelab.compress.stream import store_expert, write_plan
from moelab.errors import CheckpointError, MoelabError
from moelab.models import open_model
from moelab.models.registry import adapter_named
from moelab.models.writer import SafetensorsWriter
from moelab.offload import min_budget_bytes, offload_model

from .conftest import FAMILIES


def _files_equal(a, b) -> None:
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    for name in ("config.json", "generation_config.json", "plan.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name


def _mixed_plan(view) -> Plan:
    """Keep half the experts, but merge two of them (coefficients, a permutation, a neuron mask)."""
    layers = {}
    for b in view.blocks:
        E, I = b.num_experts, b.intermediate_size  # noqa: E741
        keep = LayerPlan.keep(b.layer, list(range(0, E, 2)))
        perm = torch.randperm(I, generator=torch.Generator().manual_seed(b.layer))
        mask = torch.arange(I) % 3 != 0
        keep.experts[0] = OutExpert([Member(0, 0.75), Member(1, 0.25, perm)], router_from=1, neuron_mask=mask)
        layers[b.layer] = keep
    return Plan("mixed", layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_written_plan_equals_save_compressed_of_apply_plan(tiny_dirs, family, tmp_path):
    """From memory and from the safetensors by offset: the same files as the in-memory path, which
    stock transformers loads into the model apply_plan builds."""
    path = tiny_dirs[family]
    view = open_model(path)
    E = view.blocks[0].num_experts
    fixed = adapter_named(view.family).fixed_routing  # a stock config that cannot change the count
    plan = _mixed_plan(view) if not fixed else Plan("merge-only", {
        b.layer: LayerPlan(b.layer, [OutExpert([Member(e, 0.5), Member((e + 1) % E, 0.5)]) for e in range(E)])
        for b in view.blocks})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = apply_plan(view, plan)
        save_compressed(built, plan, tmp_path / "memory")
        write_plan(view, plan, tmp_path / "streamed")
        _, experts = offload_model(path, budget=min_budget_bytes(*_probe(path)))
        with experts:
            write_plan(experts.view, plan, tmp_path / "offloaded", expert_rows=store_expert(experts.store))
    _files_equal(tmp_path / "memory", tmp_path / "streamed")
    _files_equal(tmp_path / "memory", tmp_path / "offloaded")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded")
    assert sorted(loaded.state_dict()) == sorted(built.state_dict())
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in loaded.state_dict().items())


def _probe(path):
    _, ex = offload_model(path, budget=1.0)
    ex.close()
    return ex.store, ex.view


def test_writer_checks_dtype_shape_and_completeness(tmp_path):
    layout = {"a": (torch.float32, (2, 3)), "b": (torch.bfloat16, (4,)), "c": (torch.int64, ())}
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4).bfloat16(), "c": torch.tensor(7)}
    with SafetensorsWriter(tmp_path / "x.safetensors", layout) as w:
        for name in ("c", "a", "b"):  # any order: each goes to its own offset
            w.write(name, tensors[name])
        with pytest.raises(MoelabError, match="already written"):
            w.write("a", tensors["a"])
        with pytest.raises(MoelabError, match="not a tensor of this checkpoint"):
            w.write("d", tensors["a"])
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(n), t) for n, t in tensors.items())
    w = SafetensorsWriter(tmp_path / "y.safetensors", layout)
    with pytest.raises(MoelabError, match=r"'a' is torch.float64 \[2, 3\], the layout says torch.float32"):
        w.write("a", tensors["a"].double())
    w.abort()
    w = SafetensorsWriter(tmp_path / "z.safetensors", layout)
    w.write("a", tensors["a"])
    with pytest.raises(CheckpointError, match="incomplete: 2 tensors were not written"):
        w.close()


@pytest.mark.parametrize("family", ["Qwen3-MoE", "GPT-OSS", "Mixtral"])
def test_trace_with_an_expert_budget_equals_the_resident_trace(tiny_dirs, family, tmp_path):
    from moelab.trace import open as open_trace
    from moelab.trace import record

    path = tiny_dirs[family]
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(seq_len=12, batch_size=2, expert_norms=True, act_max=True, progress=False)
    budget = min_budget_bytes(*_probe(path))
    record(path, ids, tmp_path / "offloaded", expert_budget=budget, **kw)
    resident = open_model(path, experts_implementation="moelab")  # same kernels as the offloaded model
    record(resident, ids, tmp_path / "resident", **kw)
    a, b = open_trace(tmp_path / "offloaded"), open_trace(tmp_path / "resident")
    assert a.manifest.identity == b.manifest.identity  # either resumes the other
    assert np.array_equal(a.token_ids, b.token_ids) and a.num_tokens == 72
    for layer in a.manifest.layers:
        for get in ("ids", "weights", "expert_norms", "act_in_max", "act_out_max"):
            assert np.array_equal(getattr(a, get)(layer.layer), getattr(b, get)(layer.layer)), get


def test_expert_statistics_of_an_offloaded_model_equal_the_resident_ones(tiny_dirs):
    from moelab.compress.calib import Calibration
    from moelab.compress.stats import expert_statistics

    path = tiny_dirs["Qwen3-MoE"]
    gen = torch.Generator().manual_seed(3)
    calib = Calibration([torch.randint(0, 64, (2, 10), generator=gen) for _ in range(3)], [None] * 6, 60, 0)
    resident = expert_statistics(open_model(path, experts_implementation="moelab"), calib)
    _, experts = offload_model(path, budget=min_budget_bytes(*_probe(path)))
    with experts:
        offloaded = expert_statistics(experts.view, calib)
        assert experts.stats().misses > 0
    for layer, s in resident.items():
        o = offloaded[layer]
        assert o.tokens == s.tokens == 60
        for name in ("count_E", "gate_sum_E", "ean_sum_E", "reap_sum_E"):
            assert torch.equal(getattr(o, name), getattr(s, name)), name
        assert s.ean_sum_E.sum() > 0


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    """Qwen3-MoE and GPT-OSS (fused experts) with the embedded corpus' tokenizer."""
    from moelab.data import default_corpus
    from moelab.models.tiny import tiny_model

    root = tmp_path_factory.mktemp("tok")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fam in ("Qwen3-MoE", "GPT-OSS"):
            out[fam] = save_compressed(tiny_model(fam, dtype=torch.float32, vocab_size=4096), Plan("none", {}),
                                       root / fam, tokenizer_from=default_corpus())
    return out


@pytest.mark.parametrize("method", ["frequency", "reap"])
@pytest.mark.parametrize("family", ["Qwen3-MoE", "GPT-OSS"])
def test_compress_with_an_expert_budget_writes_the_in_memory_checkpoint(tok_dirs, family, method, tmp_path):
    from moelab.compress.pipeline import compress
    from moelab.compress.spec import CompressSpec

    path = tok_dirs[family]
    kw = dict(kind="prune", calib_tokens=256, seq_len=32)
    spec = CompressSpec(ratio=0.5)
    ref = compress(open_model(path, experts_implementation="moelab").model, method, spec, **kw)
    res = compress(path, method, spec, out=tmp_path / "o", expert_budget="30%", **kw)
    assert res.plan.layers.keys() == ref.plan.layers.keys()
    assert all(res.plan.layers[k].sources() == ref.plan.layers[k].sources() for k in ref.plan.layers)
    assert res.params_after == ref.params_after < res.params_before
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    want = ref.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert (tmp_path / "o" / "tokenizer.json").is_file()


def test_out_of_core_refusals_name_the_problem(tok_dirs, tmp_path):
    from moelab.compress.pipeline import compress
    from moelab.compress.spec import CompressSpec
    from moelab.trace import record

    path = tok_dirs["Qwen3-MoE"]
    spec = CompressSpec(ratio=0.5)
    with pytest.raises(MoelabError, match="method 'hc-smoe' reads every expert's weights.*frequency"):
        compress(path, "hc-smoe", spec, out=tmp_path / "o", expert_budget="50%")
    with pytest.raises(MoelabError, match="expert_budget: needs out"):
        compress(path, "frequency", spec, expert_budget="50%")
    with pytest.raises(MoelabError, match="from a checkpoint directory; got a Qwen3MoeForCausalLM"):
        record(open_model(path).model, [[1, 2, 3]], tmp_path / "t", expert_budget="50%", progress=False)
    with pytest.raises(MoelabError, match="smaller than one layer's top-k experts: the minimum is"):
        record(path, [[1, 2, 3]], tmp_path / "t", expert_budget=16, progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_trace_and_prune_take_an_expert_budget(tok_dirs, tmp_path):
    from click.testing import CliRunner

    from moelab.cli import main
    from moelab.trace import open as open_trace

    path = str(tok_dirs["Qwen3-MoE"])
    run = CliRunner().invoke
    res = run(main, ["trace", path, "--out", str(tmp_path / "t"), "--max-tokens", "64", "--seq-len", "32",
                     "--expert-budget", "25%", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert open_trace(tmp_path / "t").num_tokens == 64
    res = run(main, ["prune", path, "--method", "frequency", "--ratio", "0.5", "--calib-tokens", "128",
                     "--seq-len", "32", "--out", str(tmp_path / "p"), "--expert-budget", "25%", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_local_experts"] == 4
    res = run(main, ["prune", path, "--method", "frequency", "--ratio", "0.5", "--out", str(tmp_path / "q"),
                     "--expert-budget", "1KiB", "--no-progress"])
    assert res.exit_code == 2 and "the minimum is" in res.output


@pytest.mark.parametrize("family", ["Qwen3-MoE", "GPT-OSS"])
def test_a_saved_plan_applied_out_of_core_equals_the_in_memory_checkpoint(tok_dirs, family, tmp_path):
    from moelab.compress.pipeline import apply_saved_plan

    path = tok_dirs[family]
    view = open_model(path, experts_implementation="moelab")
    plan = _mixed_plan(view)
    save_compressed(apply_plan(view, plan), plan, tmp_path / "ref")
    res = apply_saved_plan(path, tmp_path / "ref" / "plan.json", tmp_path / "o", expert_budget="30%")
    assert res.out == tmp_path / "o" and res.params_after < res.params_before
    _files_equal(tmp_path / "ref", tmp_path / "o")
    res = apply_saved_plan(path, plan, tmp_path / "m")  # in memory, from a Plan object
    _files_equal(tmp_path / "ref", tmp_path / "m")


def test_apply_plan_cli_and_its_bad_input(tok_dirs, tmp_path):
    from click.testing import CliRunner

    from moelab.cli import main

    path = tok_dirs["Qwen3-MoE"]
    view = open_model(path)
    plan = _mixed_plan(view)
    (tmp_path / "plan.json").write_text(plan.to_json())
    run = CliRunner().invoke
    res = run(main, ["apply-plan", str(tmp_path / "plan.json"), str(path), "--out", str(tmp_path / "o"),
                     "--expert-budget", "25%", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "mixed plan:" in res.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_local_experts == len(plan.layers[1].experts)
    res = run(main, ["apply-plan", str(tmp_path / "plan.json"), str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "already exists" in res.output
    (tmp_path / "bad.json").write_text('{"method": "x"}')
    res = run(main, ["apply-plan", str(tmp_path / "bad.json"), str(path), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "bad.json is not a moelab plan.json" in res.output
    other = Plan("wide", {b.layer: LayerPlan.keep(b.layer, [0, b.num_experts]) for b in view.blocks})
    (tmp_path / "wide.json").write_text(other.to_json())
    res = run(main, ["apply-plan", str(tmp_path / "wide.json"), str(path), "--out", str(tmp_path / "w")])
    assert res.exit_code == 2 and "outside [0, " in res.output and not (tmp_path / "w").exists()
    res = run(main, ["apply-plan", str(tmp_path / "plan.json"), str(path), "--out", str(tmp_path / "s"),
                     "--max-shard-size", "8kB", "--expert-budget", "25%", "--no-progress"])
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in sharded.items()) and len(ref) == len(sharded)
    res = run(main, ["prune", str(path), "--method", "frequency", "--ratio", "0.5", "--out", str(tmp_path / "x"),
                     "--max-shard-size", "5 gigs"])
    assert res.exit_code == 2 and "--max-shard-size: cannot read '5 gigs'" in res.output


def test_parse_size_reads_hub_units():
    from moelab.models.writer import parse_size

    assert parse_size("50GB", "x") == 50 * 10**9 and parse_size("1.5GiB", "x") == 3 * 2**29
    assert parse_size("8kB", "x") == 8000 and parse_size(123, "x") == 123 and parse_size(" 2 mib ", "x") == 2**21
    for bad in ("", "10%", "-1GB", "1 parsec", 0, True, 1.5):
        with pytest.raises(MoelabError, match="max_shard_size: "):
            parse_size(bad, "max_shard_size")


def test_streamed_checkpoint_in_shards_loads_as_the_in_memory_one(tiny_dirs, tmp_path):
    """With a shard size, write_plan writes shards of at most that many bytes of tensors (one too
    big alone) and the index save_pretrained writes; transformers loads it to the same tensors."""
    from moelab.models.writer import INDEX_NAME, shard_layout

    view = open_model(tiny_dirs["Qwen3-MoE"])
    plan = _mixed_plan(view)
    limit = 8_000  # bytes: several shards of the tiny model (32 KB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = apply_plan(view, plan)
        write_plan(view, plan, tmp_path / "streamed", max_shard_bytes=limit)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    stored = {}
    for file in files:
        part = load_file(tmp_path / "streamed" / file)
        assert sum(t.nbytes for t in part.values()) <= limit or len(part) == 1, file
        assert all(index["weight_map"][k] == file for k in part)
        stored.update(part)
    assert sorted(stored) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert not (tmp_path / "streamed" / "model.safetensors").exists()
    assert sorted(loaded.state_dict()) == sorted(built.state_dict())
    assert all(torch.equal(v, built.state_dict()[k]) for k, v in loaded.state_dict().items())
    big = {"a": (torch.float32, (4,)), "b": (torch.float32, (100,)), "c": (torch.float32, (5,)),
           "d": (torch.float32, (5,))}  # 16, 400, 20, 20 bytes
    assert [list(s) for s in shard_layout(big, 40)] == [["b"], ["a", "c"], ["d"]]  # b: alone
    with pytest.raises(MoelabError, match="max_shard_bytes"):
        shard_layout(big, 0)
