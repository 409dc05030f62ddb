"""apply_plan / save_compressed / simulate / masked_logits on every supported family (float64).

Tolerances: logits of a written model vs. the float64 reference hooks agree to rtol 1e-6 (several
families compute the router softmax in float32, ~1e-8 off); block outputs of the written model's view
vs. :func:`simulate` (both float64 references) to rtol 1e-9.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moelab.compress.apply import CompressWarning, apply_plan, save_compressed
from moelab.compress.plan import LayerPlan, Member, OutExpert, Plan, PlanError
from moelab.compress.simulate import keep_sets, masked_logits, simulate, simulated
from moelab.errors import MoelabError
from moelab.models import open_model, reference_forward
from moelab.models.tiny import TINY_CONFIGS

FAMILIES = list(TINY_CONFIGS)


def _close(a, b, rtol=1e-6):
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rtol * max(scale, 1e-3), (a - b).abs().max().item()


def _prune_plan(view, keep):
    return Plan("test", {b.layer: LayerPlan.keep(b.layer, keep) for b in view.blocks})


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_equals_masked_router(family, strong_model, kept_set, input_ids):
    model = strong_model(family)
    view = open_model(model)
    keep = kept_set(view)
    plan = _prune_plan(view, keep)
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
        with masked_logits(view, keep_sets(plan)):
            masked = model(input_ids=input_ids).logits
        assert (masked - base).abs().max() > 1e-2  # the mask matters: the comparison below can fail
        if family == "JetMoE":  # the expert count is shared with attention experts: refused
            with pytest.raises(PlanError, match="JetMoE"):
                apply_plan(model, plan)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompressWarning)  # groups kept, top-k unchanged
            new = apply_plan(model, plan)
        assert type(new) is type(model)
        assert open_model(new).blocks[0].num_experts == len(keep)
        _close(new(input_ids=input_ids).logits, masked)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_and_groups_of_one_are_identity(family, strong_model, input_ids):
    model = strong_model(family)
    view = open_model(model)
    E = view.blocks[0].num_experts
    one = Plan("ones", {b.layer: LayerPlan(b.layer, [OutExpert([Member(e, 1.0)]) for e in range(E)])
                        for b in view.blocks})
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
        for plan in (Plan("empty", {}), _prune_plan(view, list(range(E))), one):
            new = apply_plan(model, plan)
            assert torch.equal(new(input_ids=input_ids).logits, base)
    # same parameters, tied ones still tied
    assert sum(p.numel() for p in new.parameters()) == sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (new.get_output_embeddings().weight is new.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("DeepSeek-V2", "DeepSeek-V3")])
def test_reordered_experts_are_identity(family, strong_model, input_ids):
    model = strong_model(family)
    view = open_model(model)
    order = list(reversed(range(view.blocks[0].num_experts)))
    with torch.no_grad():
        new = apply_plan(model, _prune_plan(view, order))
        _close(new(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def _merge_plan(view, family, gen):
    b0 = view.blocks[0]
    E, I = b0.num_experts, b0.intermediate_size  # noqa: E741
    n_out = E if family == "JetMoE" else E // 2
    layers = {}
    for b in view.blocks:
        outs = []
        for o in range(n_out):
            a, c = (2 * o) % E, (2 * o + 1) % E
            outs.append(OutExpert(
                [Member(a, 0.6, torch.randperm(I, generator=gen)),
                 Member(c, torch.rand(I, generator=gen, dtype=torch.float64))],
                router_from=c, neuron_mask=torch.rand(I, generator=gen) > 0.3))
        layers[b.layer] = LayerPlan(b.layer, outs)
    return Plan("merge", layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_simulate(family, strong_model, input_ids):
    model = strong_model(family)
    view = open_model(model)
    plan = _merge_plan(view, family, torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressWarning)  # DeepSeek-V3 loses its groups here
        new = apply_plan(model, plan)
    new_view = open_model(new)
    x_TH = torch.randn(40, view.blocks[0].hidden_size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(5))
    for b in view.blocks:
        _close(reference_forward(new_view.block(b.layer), x_TH), simulate(view, plan, x_TH, b.layer), 1e-9)
    with torch.no_grad(), simulated(view, plan):
        ref = model(input_ids=input_ids).logits
    with torch.no_grad():
        _close(new(input_ids=input_ids).logits, ref)


@pytest.mark.parametrize("family", ["Mixtral", "GPT-OSS", "Llama4", "DBRX", "Qwen2-MoE"])
def test_neuron_mask_zeroes_and_equals_simulate(family, strong_model, input_ids):
    model = strong_model(family)
    view = open_model(model)
    E, I = view.blocks[0].num_experts, view.blocks[0].intermediate_size  # noqa: E741
    gen = torch.Generator().manual_seed(11)
    masks = {(b.layer, e): torch.rand(I, generator=gen) > 0.5 for b in view.blocks for e in range(E)}
    plan = Plan("atomic", {b.layer: LayerPlan(b.layer, [OutExpert([Member(e)], neuron_mask=masks[b.layer, e])
                                                         for e in range(E)]) for b in view.blocks})
    new = apply_plan(model, plan)
    nb = open_model(new).blocks[0]
    m = masks[nb.layer, 1]
    assert not nb.gate[1][~m].any() and not nb.up[1][~m].any() and not nb.down[1][:, ~m].any()
    assert torch.equal(nb.gate[1][m], view.blocks[0].gate[1][m])
    with torch.no_grad(), simulated(view, plan):
        ref = model(input_ids=input_ids).logits
    with torch.no_grad():
        out = new(input_ids=input_ids).logits
        _close(out, ref)
        assert (out - model(input_ids=input_ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trips_through_from_pretrained(family, strong_model, kept_set, input_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = strong_model(family)
    view = open_model(model)
    keep = kept_set(view) if family != "JetMoE" else list(range(view.blocks[0].num_experts))
    plan = _prune_plan(view, keep)
    new = apply_plan(model, plan)
    out = save_compressed(new, plan, tmp_path / "out")
    assert (out / "plan.json").is_file() and list(out.glob("*.safetensors"))
    assert Plan.from_json((out / "plan.json").read_text()).layers.keys() == plan.layers.keys()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, experts_implementation="eager")
    new_sd = new.state_dict()
    for name, t in loaded.state_dict().items():  # exact, except where the family keeps fp32 (HunYuan wg)
        assert torch.equal(t, new_sd[name].to(t.dtype)), name
    with torch.no_grad():
        _close(loaded(input_ids=input_ids).logits, new(input_ids=input_ids).logits)


def test_top_k_clamped_with_a_warning(strong_model, input_ids):
    model = strong_model("Qwen3-MoE")
    view = open_model(model)
    plan = _prune_plan(view, [5])
    with pytest.warns(CompressWarning, match="top_k clamped from 2 to 1"):
        new = apply_plan(model, plan)
    assert new.config.num_experts_per_tok == 1 and plan.meta["apply"]["top_k"] == 1
    with torch.no_grad(), masked_logits(view, keep_sets(plan)):
        _close(new(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_groups_switched_off_when_not_kept(strong_model, input_ids):
    model = strong_model("DeepSeek-V3", n_routed_experts=8)
    view = open_model(model)
    plan = _prune_plan(view, [0, 2, 4, 6])  # one per group: group scores need two
    with pytest.warns(CompressWarning, match="group-limited routing switched off"):
        new = apply_plan(model, plan)
    assert new.config.n_group == 1 and plan.meta["apply"]["n_group"] is None
    with torch.no_grad(), simulated(view, plan):
        _close(new(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


@pytest.mark.parametrize("make_plan, match", [
    (lambda v: Plan("x", {7: LayerPlan.keep(7, [0])}), "layer 7: the model has no MoE block"),
    (lambda v: Plan("x", {0: LayerPlan.keep(0, [0, 9])}), r"member 9 outside \[0, 4\)"),
    (lambda v: Plan("x", {0: LayerPlan(0, []), 1: LayerPlan(1, [])}), "removes every expert"),
    (lambda v: Plan("x", {0: LayerPlan.keep(0, [0, 1])}), "one expert count for all layers"),
    (lambda v: Plan("x", {b.layer: LayerPlan.keep(b.layer, [0, 1]) for b in v.blocks}, top_k=3),
     "top_k: 3 is more than the 2"),
])
def test_bad_plans_are_refused(make_plan, match):
    model = strong_model_plain()
    with pytest.raises(PlanError, match=match):
        apply_plan(model, make_plan(open_model(model)))


def strong_model_plain():
    from moelab.models.tiny import tiny_model

    return tiny_model("Mixtral")


def test_phimoe_needs_two_experts():
    from moelab.models.tiny import tiny_model

    model = tiny_model("PhiMoE")
    with pytest.raises(PlanError, match="SparseMixer"):
        apply_plan(model, _prune_plan(open_model(model), [1]))


def test_masked_logits_refuses_bad_keep():
    model = strong_model_plain()
    view = open_model(model)
    with pytest.raises(PlanError, match="removes every expert"), masked_logits(view, {0: []}):
        pass
    with pytest.raises(PlanError, match="no MoE block"), masked_logits(view, {5: [0]}):
        pass


def test_existing_output_dir_is_refused_unless_overwrite(tmp_path):
    model = strong_model_plain()
    plan = Plan("empty", {})
    new = apply_plan(model, plan)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(MoelabError, match="already exists"):
        save_compressed(new, plan, tmp_path / "out")
    save_compressed(new, plan, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "config.json").is_file()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    model = strong_model_plain()
    plan = Plan("empty", {})
    new = apply_plan(model, plan)

    def boom(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Plan, "to_json", boom)  # fails after the weights are written
    with pytest.raises(KeyboardInterrupt):
        save_compressed(new, plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_files_are_copied(tmp_path):
    from moelab.data import default_corpus

    model = strong_model_plain()
    plan = Plan("empty", {})
    out = save_compressed(apply_plan(model, plan), plan, tmp_path / "out", tokenizer_from=default_corpus())
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    with pytest.raises(MoelabError, match="tokenizer_from"):
        save_compressed(apply_plan(model, plan), plan, tmp_path / "o2", tokenizer_from=tmp_path / "nope")
    assert not (tmp_path / "o2").exists()


def test_apply_keeps_dtypes_and_draws_no_random_numbers():
    from moelab.models.tiny import tiny_model

    model = tiny_model("HunYuan-MoE", dtype=torch.bfloat16)
    model.model.layers[0].mlp.gate.wg.float()  # mixed precision, as HunYuan keeps its router in fp32
    state = torch.random.get_rng_state()
    new = apply_plan(model, _prune_plan(open_model(model), [0, 1]))
    assert torch.equal(state, torch.random.get_rng_state())
    assert new.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    assert new.model.layers[1].mlp.gate.wg.weight.dtype == torch.bfloat16
    assert new.model.embed_tokens.weight.dtype == torch.bfloat16
