"""Recording: the stored routing equals the view's reference, hooks come off, resume is exact."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

import moelab.trace
from moelab.errors import TraceError
from moelab.models import expert_forward, glu_activation, open_model, reference_route
from moelab.trace import CorpusError

ALL_FIELDS = dict(logits=True, expert_norms=True, act_max=True, hidden_norm=True)


def _hidden_per_layer(view, trace):
    """Each MoE block's input for every token of the trace, by running each sequence alone: ``{layer: [N, H]}``."""
    seen = {b.layer: [] for b in view.blocks}
    handles = [b.register_routing_hook(lambda ev, lay=b.layer: seen[lay].append(ev.hidden_TH.clone()))
               for b in view.blocks]
    seq, tok = trace.seq_ids, trace.token_ids
    try:
        with torch.no_grad():
            for s in np.unique(seq):
                view.model.base_model(input_ids=torch.from_numpy(tok[seq == s].astype(np.int64))[None],
                                      use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {lay: torch.cat(xs) for lay, xs in seen.items()}


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_recorded_routing_equals_the_reference_route(full_trace, model_dir):
    view = open_model(str(model_dir))
    hidden = _hidden_per_layer(view, full_trace)
    for block in view.blocks:
        x_TH = hidden[block.layer]
        logits_TE, ids_TK, w_TK = reference_route(block, x_TH)
        ids = full_trace.ids(block.layer).astype(np.int64)
        order = np.argsort(ids, axis=1)  # compare as (expert, weight) sets: slot order is not a contract
        ref_order = torch.argsort(ids_TK, dim=1)
        np.testing.assert_array_equal(np.take_along_axis(ids, order, 1), ids_TK.gather(1, ref_order).numpy())
        np.testing.assert_allclose(np.take_along_axis(full_trace.weights(block.layer), order, 1),
                                   w_TK.gather(1, ref_order).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(full_trace.logits(block.layer), logits_TE.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(full_trace.hidden_norm(block.layer),
                                   x_TH.double().norm(dim=-1).numpy(), rtol=1e-5)


def test_expert_norms_and_act_max_equal_the_float64_expert(full_trace, model_dir):
    view = open_model(str(model_dir))
    hidden = _hidden_per_layer(view, full_trace)
    for block in view.blocks:
        x = hidden[block.layer].double()
        ids = full_trace.ids(block.layer)
        norm, act_in, act_out = (np.zeros(ids.shape) for _ in range(3))
        for t in range(ids.shape[0]):
            for k in range(ids.shape[1]):
                e = int(ids[t, k])
                y = expert_forward(block, e, x[t:t + 1])[0]
                h = glu_activation(block.act, x[t] @ block.gate[e].double().T, x[t] @ block.up[e].double().T)
                norm[t, k], act_in[t, k], act_out[t, k] = y.norm(), h.abs().max(), y.abs().max()
        np.testing.assert_allclose(full_trace.expert_norms(block.layer), norm, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(full_trace.act_in_max(block.layer), act_in, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(full_trace.act_out_max(block.layer), act_out, rtol=1e-4, atol=1e-7)


def test_tokens_and_labels_follow_the_corpus(full_trace, model_dir, corpus_dir):
    tok = moelab.trace.TextTokenizer(model_dir)
    code = tok.encode([(corpus_dir / "code.txt").read_text()])[0]
    sel = full_trace.select(labels=["code"])
    assert sel.token_ids.tolist() == code[: sel.num_tokens]
    assert full_trace.labels[:48].tolist() == [0] * 16 + [1] * 16 + [2] * 16  # round-robin sequences


def test_hooks_are_removed_and_the_model_is_untouched(make_tiny, model_dir, corpus_dir, tmp_path):
    model = make_tiny()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = _hook_count(model)
    impl = model.config._experts_implementation
    moelab.trace.record(model, corpus_dir, tmp_path / "a", tokenizer=model_dir, seq_len=16,
                        max_tokens=64, progress=False, **ALL_FIELDS)
    assert _hook_count(model) == n_hooks and model.training
    assert model.config._experts_implementation == impl  # the backend the trace used is off again
    from moelab.models.backend import experts_backend
    assert all(experts_backend(b) is None for b in open_model(model).blocks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def boom(event):
        raise RuntimeError("boom")

    handle = open_model(model).blocks[1].register_routing_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        moelab.trace.record(model, corpus_dir, tmp_path / "b", tokenizer=model_dir, seq_len=16,
                            max_tokens=64, progress=False)
    handle.remove()
    assert _hook_count(model) == n_hooks and model.training
    with pytest.raises(TraceError, match="incomplete"):
        moelab.trace.open(tmp_path / "b")


def _record(model_dir, corpus_dir, out, **kw):
    args = dict(seq_len=16, batch_size=4, max_tokens=300, shard_tokens=64, progress=False, **ALL_FIELDS)
    return moelab.trace.record(str(model_dir), corpus_dir, out, **{**args, **kw})


def test_interrupted_run_resumes_to_the_identical_store(full_trace, model_dir, corpus_dir, tmp_path):
    view = open_model(str(model_dir))
    calls = {"n": 0}

    def interrupt(event):
        calls["n"] += 1
        if calls["n"] == 3:  # block 0, third batch: the third shard (one batch per shard here)
            raise KeyboardInterrupt

    handle = view.blocks[0].register_routing_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        moelab.trace.record(
            view, corpus_dir, tmp_path, seq_len=16, batch_size=4, max_tokens=300, shard_tokens=64,
            progress=False, **ALL_FIELDS)
    handle.remove()
    partial = moelab.trace.store.read_manifest(tmp_path)
    assert not partial.complete and 0 < len(partial.shards) < partial.num_shards
    _record(model_dir, corpus_dir, tmp_path)
    assert _file_hashes(tmp_path) == _file_hashes(full_trace.directory)


def test_truncated_shard_is_recorded_again_on_resume(full_trace, model_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "t"
    shutil.copytree(full_trace.directory, out)
    victim = out / "shard-00001.parquet"
    victim.write_bytes(victim.read_bytes()[:100])
    _record(model_dir, corpus_dir, out)
    assert "shard-00001.parquet is truncated" in capsys.readouterr().err
    assert _file_hashes(out) == _file_hashes(full_trace.directory)


def test_a_different_trace_is_refused_unless_overwrite(full_trace, model_dir, corpus_dir, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(full_trace.directory, out)
    with pytest.raises(TraceError, match=r"already holds a different trace: record differs \(seq_len\)"):
        _record(model_dir, corpus_dir, out, seq_len=8)
    with pytest.raises(TraceError, match="resume is off"):
        _record(model_dir, corpus_dir, out, resume=False)
    t = _record(model_dir, corpus_dir, out, seq_len=8, max_tokens=40, overwrite=True)
    assert t.manifest.identity["record"]["seq_len"] == 8 and t.positions.max() == 7
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TraceError, match="not empty and holds no trace"):
        _record(model_dir, corpus_dir, foreign)


def test_check_matches_says_what_differs(make_tiny, full_trace, model_dir):
    full_trace.check_matches(str(model_dir))
    with pytest.raises(TraceError, match=r"router weights differ in layers \[0, 1\]"):
        full_trace.check_matches(make_tiny(seed=1))
    with pytest.raises(TraceError, match=r"config keys differ: num_local_experts=8 \(trace\) vs 4 \(model\)"):
        full_trace.check_matches(make_tiny(experts=4))
    with pytest.raises(TraceError, match=r"MoE layers \[0, 1\] \(trace\) vs \[0, 1, 2\]"):
        full_trace.check_matches(make_tiny(layers=3))


def test_token_ids_texts_and_bad_inputs(make_tiny, model_dir, tmp_path):
    model = make_tiny()
    ids = torch.randint(1, 320, (3, 20))
    t = moelab.trace.record(model, ids, tmp_path / "ids", seq_len=20, labels=["x", "y", "x"], progress=False)
    np.testing.assert_array_equal(t.token_ids, ids.reshape(-1).numpy())  # x, y, x: round-robin by label
    assert t.labels.tolist() == [0] * 20 + [1] * 20 + [0] * 20
    assert t.label_names == ["x", "y"] and t.manifest.identity["tokenizer"] is None
    t = moelab.trace.record(model, ["hello there", "def f(): pass"], tmp_path / "txt", seq_len=8,
                            tokenizer=model_dir, progress=False)
    assert t.label_names is None and t.num_tokens > 4
    with pytest.raises(CorpusError, match="ambiguous"):
        moelab.trace.record(model, "hello", tmp_path / "s", progress=False)
    with pytest.raises(CorpusError, match=r"must lie in \[0, 320\)"):
        moelab.trace.record(model, [[1, 2, 999]], tmp_path / "v", progress=False)
    with pytest.raises(CorpusError, match="need a tokenizer"):
        moelab.trace.record(model, ["text"], tmp_path / "n", progress=False)
    with pytest.raises(TraceError, match="seq_len must be a positive integer"):
        moelab.trace.record(model, ids, tmp_path / "z", seq_len=0, progress=False)


def test_a_steered_model_is_traced_after_its_edits(make_tiny, model_dir, corpus_dir, tmp_path):
    """Observers see the routing after edits: switched-off experts never appear, skipped slots are -1."""
    from moelab.steer import experts_off, skip_below

    model = make_tiny()
    view = open_model(model)
    with experts_off(view, {0: [0, 1]}), skip_below(view, {1: 1.0}):
        trace = moelab.trace.record(view, corpus_dir, tmp_path / "t", tokenizer=model_dir, seq_len=16,
                                    max_tokens=64, progress=False, expert_norms=True)
    ids0, ids1 = trace.ids(0), trace.ids(1)
    assert not np.isin(ids0, [0, 1]).any()
    assert (ids1 == -1).sum(axis=1).tolist() == [1] * len(ids1)  # top-2: the weaker slot is skipped
    norms1 = trace.expert_norms(1)
    assert (norms1[ids1 == -1] == 0).all() and (norms1[ids1 >= 0] > 0).all()
