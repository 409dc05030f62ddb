"""The fine / coarse / dense presets: stock transformers models, the aux-loss-free bias update, training.

Every model here is a debug size (``tiny``, ``tiny-fine``, ``tiny-dense``): seconds per test.
"""

from __future__ import annotations

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.nn.routing import Routing
from moelab.train.config import PRESETS, hf_config, make_config
from moelab.train.loop import build_model, train
from moelab.train.losses import sigmoid_lm_losses
from moelab.train.routing import RoutingRecorder, update_correction_bias

TINY = {"tiny": "Qwen3MoeForCausalLM", "tiny-fine": "DeepseekV3ForCausalLM", "tiny-dense": "Qwen3ForCausalLM"}


def _tiny_fine_model():
    return build_model(make_config("tiny-fine", corpus="unused"), vocab_size=64, eos=0)


@pytest.mark.parametrize("preset", list(TINY))
def test_presets_build_stock_models_that_round_trip_from_pretrained(preset, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(make_config(preset, corpus="unused"), vocab_size=64, eos=0)
    assert type(model).__name__ == TINY[preset]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(loaded).__name__ == TINY[preset]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_full_size_presets_have_the_advertised_shapes():
    fine, coarse, dense = (hf_config(make_config(p, corpus="unused"), 4096, 0) for p in ("fine", "coarse", "dense"))
    assert (fine.n_routed_experts, fine.num_experts_per_tok, fine.n_shared_experts, fine.first_k_dense_replace) == (32, 7, 1, 1)
    # fine-grained segmentation keeps active and total routed width: 8 x 64 active = 2 x 256, 32 x 64 = 8 x 256
    assert fine.moe_intermediate_size * (fine.num_experts_per_tok + fine.n_shared_experts) == \
        coarse.moe_intermediate_size * coarse.num_experts_per_tok == fine.intermediate_size
    assert fine.n_routed_experts * fine.moe_intermediate_size == coarse.num_experts * coarse.moe_intermediate_size \
        == dense.intermediate_size
    assert fine.hidden_size == coarse.hidden_size == dense.hidden_size
    # one token budget for the comparison; the default preset stays the shipped recipe
    budgets = {p: make_config(p, corpus="unused").steps * make_config(p, corpus="unused").tokens_per_step
               for p in ("fine", "coarse", "dense")}
    assert len(set(budgets.values())) == 1, budgets
    assert make_config("default", corpus="unused").steps == 12000 and PRESETS["default"] == {}


def test_fine_grained_model_opens_as_a_view_with_sigmoid_routing_and_a_shared_expert():
    view = open_model(_tiny_fine_model())
    assert view.dense_layers == [0] and [b.layer for b in view.blocks] == [1]
    block = view.blocks[0]
    assert (block.family, block.scoring, block.num_experts, block.top_k) == ("DeepSeek-V3", "sigmoid", 8, 3)
    assert block.shared is not None and block.correction_bias is not None


def test_bias_update_moves_overloaded_experts_down_and_underloaded_up():
    model = _tiny_fine_model()
    view = open_model(model)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    counts_LE = torch.tensor([[10.0, 10.0, 10.0, 10.0, 0.0, 0.0, 20.0, 20.0]])  # mean 10
    delta = update_correction_bias(view, counts_LE, rate=1e-3)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.0, 1e-3, 1e-3, -1e-3, -1e-3])
    torch.testing.assert_close(bias, expected)  # the model's own buffer moved
    torch.testing.assert_close(delta[0], expected)
    # balanced load leaves the bias where it is
    update_correction_bias(view, torch.full((1, 8), 7.0), rate=1e-3)
    torch.testing.assert_close(bias, expected)
    with pytest.raises(MoelabError, match="rows of counts"):
        update_correction_bias(view, torch.ones(2, 8), rate=1e-3)


def test_recorder_counts_the_experts_selection_including_the_bias():
    model = _tiny_fine_model().eval()
    gate = model.model.layers[1].mlp.gate
    gate.e_score_correction_bias[2] = 10.0  # every token must now pick expert 2
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=ids)
        counts_LE = torch.stack([r.tokens_per_expert().float() for r in rec.routings])
    assert counts_LE.shape == (1, 8) and counts_LE.sum() == 16 * 3
    assert counts_LE[0, 2] == 16  # raw router logits alone would not show this


def test_training_step_updates_the_bias_from_that_steps_counts(tiny_corpus):
    from moelab.data.streams import encode_split
    from moelab.train.loop import make_optimizer, train_step

    cfg = make_config("tiny-fine", corpus=tiny_corpus)
    model = build_model(cfg, vocab_size=600, eos=0)
    opt, gen, streams = make_optimizer(cfg, model), torch.Generator().manual_seed(0), encode_split(tiny_corpus, "train")
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    with RoutingRecorder(model) as rec:
        for _ in range(3):
            before = bias.clone()
            losses = train_step(cfg, model, opt, streams, gen, 0, rec)
            counts_E = losses.load_LE[0]
            assert counts_E.sum() == cfg.tokens_per_step * cfg.top_k and counts_E.std() > 0  # unbalanced
            torch.testing.assert_close(bias - before, cfg.bias_rate * torch.sign(counts_E.mean() - counts_E))


def test_sigmoid_losses_are_one_when_balanced_and_reach_the_router():
    T, E, K = 8, 4, 2
    logits_TE = torch.zeros(T, E, requires_grad=True)
    ids_TK = torch.tensor([[0, 1], [2, 3]] * 4)
    routing = Routing(logits_TE=logits_TE.detach(), ids_TK=ids_TK, weights_TK=torch.full((T, K), 0.5))
    logits_BSV = torch.randn(2, 4, 10, requires_grad=True)
    losses = sigmoid_lm_losses(logits_BSV, torch.randint(0, 10, (2, 4)), (logits_TE,), [routing], aux_coef=0.5)
    assert losses.balance.item() == pytest.approx(1.0)
    assert losses.z.item() == 0.0 and losses.load_LE.tolist() == [[4.0, 4.0, 4.0, 4.0]]
    losses.total.backward()
    assert logits_TE.grad is not None


@pytest.mark.parametrize("preset", ["tiny-fine", "tiny-dense"])
def test_fine_and_dense_debug_presets_train_and_resume(preset, tiny_corpus, tmp_path):
    cfg = make_config(preset, corpus=tiny_corpus, steps=6)
    straight = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", stop_at=3, progress=False)
    resumed = train(cfg, tmp_path / "b", progress=False)
    assert resumed.resumed_from == 3
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[3:]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("preset", "field", "value", "match"), [
    ("tiny", "arch", "mixtral", "arch: expected one of"),
    ("tiny", "shared_experts", 1, "only deepseek_v3"),
    ("tiny-fine", "num_kv_heads", 1, "MLA needs num_kv_heads"),
    ("tiny-fine", "z_coef", 1e-3, "sigmoid routing"),
    ("tiny-fine", "dense_layers", 2, "leaves no MoE layer"),
    ("tiny-dense", "num_experts", 4, "dense model has no router"),
    ("tiny-dense", "dense_ffn", 0, "needs its FFN width"),
    ("tiny-fine", "bias_rate", -1.0, "bias_rate: expected >= 0"),
])
def test_arch_validation_names_the_field(preset, field, value, match):
    with pytest.raises(MoelabError, match=match):
        make_config(preset, corpus="unused", **{field: value})


def test_fields_added_later_keep_old_fingerprints():
    cfg = make_config("default", corpus="unused")
    fp = cfg.fingerprint("sha")
    assert not {"arch", "shared_experts", "dense_layers", "dense_ffn", "bias_rate"} & set(fp)
    assert make_config("fine", corpus="unused").fingerprint("sha")["arch"] == "deepseek_v3"
