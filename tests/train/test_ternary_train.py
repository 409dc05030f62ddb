"""Quantisation-aware training with ternary experts (MoTE) through ``moelab train``, and fine-tuning
from a model folder (``init_from``)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.train.config import make_config
from moelab.train.export import export_model
from moelab.train.loop import train


def test_ternary_run_exports_ternary_experts_that_stock_transformers_runs(tiny_corpus, tmp_path):
    train(make_config("tiny-fine", corpus=tiny_corpus, steps=2), tmp_path / "base", progress=False)
    export_model(tmp_path / "base", tmp_path / "base-model", eval_tokens=512)
    cfg = make_config("tiny-fine", corpus=tiny_corpus, steps=3, ternary_experts=True,
                      init_from=str(tmp_path / "base-model"))
    result = train(cfg, tmp_path / "qat", progress=False)
    assert result.state.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    card = export_model(tmp_path / "qat", tmp_path / "qat-model", eval_tokens=512)
    assert card["train_config"]["ternary_experts"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qat-model")
    view = open_model(model)
    for b in view.blocks:
        for w in (b.gate, b.up, b.down):  # each expert matrix holds {-c, 0, +c} for one c
            for e in range(b.num_experts):
                mags = w[e].detach().abs().unique()
                assert len(mags[mags > 0]) == 1, (b.layer, e)
    shared = view.blocks[0].shared  # the shared expert stays full precision
    if shared is not None and shared.gate is not None:
        assert len(set(shared.gate.flatten().tolist())) > 3


def test_init_from_starts_from_the_folders_weights(tiny_corpus, tmp_path):
    train(make_config("tiny", corpus=tiny_corpus, steps=2), tmp_path / "a", progress=False)
    export_model(tmp_path / "a", tmp_path / "a-model", eval_tokens=512)
    cfg = make_config("tiny", corpus=tiny_corpus, steps=1, lr=1e-12, warmup_steps=0, init_from=str(tmp_path / "a-model"))
    train(cfg, tmp_path / "b", progress=False)
    export_model(tmp_path / "b", tmp_path / "b-model", eval_tokens=512)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a-model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b-model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # one step at lr ~0 moves nothing


def test_bad_input(tiny_corpus, tmp_path):
    with pytest.raises(MoelabError, match="ternary_experts: a dense model has no experts"):
        make_config("tiny-dense", corpus=tiny_corpus, ternary_experts=True)
    with pytest.raises(MoelabError, match="init_from: .*no config.json"):
        train(make_config("tiny", corpus=tiny_corpus, steps=1, init_from=str(tmp_path)), tmp_path / "r", progress=False)
    train(make_config("tiny-fine", corpus=tiny_corpus, steps=1), tmp_path / "f", progress=False)
    export_model(tmp_path / "f", tmp_path / "f-model", eval_tokens=256)
    with pytest.raises(MoelabError, match="init_from: .*does not match the qwen3_moe model"):
        train(make_config("tiny", corpus=tiny_corpus, steps=1, init_from=str(tmp_path / "f-model")), tmp_path / "g",
              progress=False)
    res = CliRunner().invoke(main, ["train", "--preset", "tiny-dense", "--corpus", str(tiny_corpus), "--out",
                                    str(tmp_path / "h"), "--ternary-experts", "--no-progress"])
    assert res.exit_code == 2 and "dense model has no experts" in res.output


def test_training_on_the_moelab_experts_backend_matches_the_default_kernel(tiny_corpus, tmp_path):
    """The same run on transformers' experts kernel and on moelab's backend: equal losses (float32,
    summation order only: rel 1e-4 over 4 steps), and the choice does not change the fingerprint of
    runs that never set it."""
    losses = {}
    for impl in ("transformers", "moelab"):
        cfg = make_config("tiny-fine", corpus=tiny_corpus, steps=4, experts_implementation=impl)
        losses[impl] = train(cfg, tmp_path / impl, progress=False).losses
    assert losses["moelab"] == pytest.approx(losses["transformers"], rel=1e-4)
    assert "experts_implementation" not in make_config("tiny", corpus=tiny_corpus).fingerprint("x")
    with pytest.raises(MoelabError, match="experts_implementation: expected one of transformers, moelab"):
        make_config("tiny", corpus=tiny_corpus, experts_implementation="nope")
