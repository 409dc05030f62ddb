"""moelab's experts backend (``experts_implementation="moelab"``) on every tiny family, float64.

The backend must equal transformers' eager experts to 1e-6 relative (float64; only summation order
differs, so the observed gap is ~1e-15): logits, the input-embedding gradient and every parameter's
gradient, under a random output gradient. Then the provider contract, observers, masks, undoing
it, and bad input.
"""

import warnings

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import expert_forward, open_model, reference_route
from moelab.models.backend import (
    ExpertWeights,
    disable_experts_backend,
    enable_experts_backend,
    experts_backend,
    own_parameters,
)
from moelab.models.tiny import TINY_CONFIGS, tiny_model

FAMILIES = list(TINY_CONFIGS)
F64 = torch.float64


def quiet_model(family, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_model(family, **kw)


def run(model, embeds, dy):
    x = embeds.clone().requires_grad_()
    y = model(inputs_embeds=x).logits
    y.backward(dy)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, V = model.config.hidden_size, model.config.vocab_size
    return torch.randn(2, 7, H, generator=g, dtype=F64), torch.randn(
        2, 7, V, generator=g, dtype=F64
    )


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()) + 1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_moelab_backend_equals_eager_forward_and_backward(family):
    eager, ours = quiet_model(family), quiet_model(family)
    view = open_model(ours, experts_implementation="moelab")
    assert all(experts_backend(b) is not None for b in view.blocks)
    embeds, dy = inputs(eager)
    y0, dx0, g0 = run(eager, embeds, dy)
    y1, dx1, g1 = run(ours, embeds, dy)
    close(y1, y0)
    close(dx1, dx0)
    assert g1.keys() == g0.keys()
    expert_grads = 0
    for name in g0:
        close(g1[name], g0[name])
        expert_grads += "expert" in name or "mlp.w" in name or "mlp.v" in name
    assert expert_grads >= 2  # the experts' parameters did get gradients


def _counting(calls, copy=False, compact=False):
    def provider(block, ids_n):
        calls.append((block.layer, ids_n.tolist()))
        w = own_parameters(block, ids_n)
        ts = [None if t is None else t.detach().clone() if copy else t for t in w.as_tuple()]
        if compact:
            ts = [None if t is None else t[ids_n] for t in ts]
        return ExpertWeights(*ts)

    return provider


@pytest.mark.parametrize("family", ["Qwen3-MoE", "GPT-OSS", "Llama4", "DBRX", "JetMoE"])
@pytest.mark.parametrize("compact", [False, True])
def test_provider_returning_copies_gives_the_same_output(family, compact):
    model = quiet_model(family)
    embeds, _ = inputs(model)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds).logits
    view = open_model(model)
    calls = []
    enable_experts_backend(view, _counting(calls, copy=True, compact=compact))
    with torch.no_grad():
        y = model(inputs_embeds=embeds).logits
    close(y, ref)
    assert len(calls) == len(view.blocks)


@pytest.mark.parametrize("family", ["Mixtral", "DeepSeek-V3", "Llama4", "JetMoE"])
def test_counting_provider_sees_only_the_needed_experts(family):
    model = (
        quiet_model(family, num_experts_per_tok=1)
        if family != "DeepSeek-V3"
        else quiet_model(family)
    )
    view = open_model(model)
    calls, routed = [], {}
    for b in view.blocks:
        b.register_routing_hook(lambda ev: routed.setdefault(ev.block.layer, ev.ids_TK))
    enable_experts_backend(view, _counting(calls))
    x = torch.randn(1, 2, model.config.hidden_size, dtype=F64)  # 2 tokens: few experts needed
    with torch.no_grad():
        model(inputs_embeds=x)
    assert sorted(layer for layer, _ in calls) == sorted(routed)
    for layer, ids in calls:
        assert ids == sorted(set(routed[layer].reshape(-1).tolist()))
        assert len(ids) < view.block(layer).num_experts


@pytest.mark.parametrize("family", ["Mixtral", "GPT-OSS", "Llama4"])
def test_observer_sees_slot_output_norms_and_activation_maxima(family):
    view = open_model(quiet_model(family), experts_implementation="moelab")
    block = view.blocks[0]
    seen = []
    handle = experts_backend(block).add_observer(seen.append)
    x_TH = torch.randn(6, block.hidden_size, dtype=F64)
    _, ids_TK, w_TK = reference_route(block, x_TH)
    experts_backend(block)(x_TH, ids_TK, w_TK)
    (stats,) = seen
    for t in range(6):
        for k in range(block.top_k):
            e = int(ids_TK[t, k])
            xin = x_TH[t : t + 1] * (w_TK[t, k] if block.combine == "input" else 1.0)
            torch.testing.assert_close(
                stats.out_norm_TK[t, k], expert_forward(block, e, xin).norm()
            )
    assert bool((stats.act_max_TK > 0).all())
    handle.remove()
    experts_backend(block)(x_TH, ids_TK, w_TK)
    assert len(seen) == 1


def _expected(block, x_TH, ids_TK, w_TK, keep_TK):
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(ids_TK.shape[1]):
            if keep_TK[t, k]:
                out[t] += w_TK[t, k] * expert_forward(block, int(ids_TK[t, k]), x_TH[t : t + 1])[0]
    return out


@pytest.mark.parametrize("family", ["Qwen2-MoE", "GPT-OSS"])
def test_masked_and_sentinel_slots_are_skipped(family):
    view = open_model(quiet_model(family), experts_implementation="moelab")
    block = view.blocks[0]
    backend = experts_backend(block)
    seen = []
    backend.add_observer(seen.append)
    x_TH = torch.randn(8, block.hidden_size, dtype=F64)
    _, ids_TK, w_TK = reference_route(block, x_TH)
    mask = torch.rand(ids_TK.shape, generator=torch.Generator().manual_seed(3)) > 0.4
    close(backend(x_TH, ids_TK, w_TK, mask), _expected(block, x_TH, ids_TK, w_TK, mask))
    assert bool((seen[-1].out_norm_TK[~mask] == 0).all())
    sentinel = ids_TK.masked_fill(~mask, block.num_experts)  # transformers' EP convention
    with torch.no_grad():
        y = block.experts_module(x_TH, sentinel, w_TK)  # through ExpertsInterface
    close(y, _expected(block, x_TH, ids_TK, w_TK, mask))
    with torch.no_grad():  # the explicit keyword channel through transformers' experts call
        y = block.experts_module(x_TH, ids_TK, w_TK, mask_TK=mask)
    close(y, _expected(block, x_TH, ids_TK, w_TK, mask))


@pytest.mark.parametrize("family", ["Mixtral", "Llama4", "DBRX"])
def test_disable_restores_the_original_forward(family):
    model = quiet_model(family)
    embeds, _ = inputs(model)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds).logits
    view = open_model(model, experts_implementation="moelab")
    disable_experts_backend(view)
    assert all(experts_backend(b) is None for b in view.blocks)
    assert all(
        "forward" not in vars(b.module) and "forward" not in vars(b.experts_module)
        for b in view.blocks
    )
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=embeds).logits, ref)
    open_model(model, experts_implementation="eager")  # also turns it off


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(MoelabError, match=r"experts_implementation='fast'.*'moelab'"):
        open_model(quiet_model("Mixtral"), experts_implementation="fast")


def test_moelab_implementation_without_the_backend_is_a_clear_error():
    model = quiet_model("Mixtral")
    open_model(model)  # registers nothing; set the name by hand, as transformers users would
    from moelab.models.backend import register

    register()
    model.set_experts_implementation("moelab")
    with pytest.raises(MoelabError, match="open_model"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_provider_with_wrong_shapes_is_a_clear_error():
    view = open_model(quiet_model("Mixtral"))

    def bad(block, ids_n):
        w = own_parameters(block, ids_n)
        return ExpertWeights(w.gate[:1, :, :2], w.up[:1, :, :2], w.down[:1])

    enable_experts_backend(view, bad)
    with pytest.raises(MoelabError, match="weights provider returned"):
        view.model(torch.zeros(1, 3, dtype=torch.long))


def test_float32_decoding_uses_grouped_mm_on_the_models_own_storage(monkeypatch):
    """Few rows per expert at inference: grouped_mm straight on transformers' fused gate_up_proj
    (one call for gate and up, no copy) and on down_proj, equal to eager."""
    eager, ours = quiet_model("Qwen3-MoE", dtype=torch.float32), quiet_model(
        "Qwen3-MoE", dtype=torch.float32
    )
    open_model(ours, experts_implementation="moelab")
    calls = []
    real = torch.nn.functional.grouped_mm

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting)
    ids = torch.tensor([[3, 9]])
    with torch.no_grad():
        y0, y1 = eager(ids).logits, ours(ids).logits
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * 2  # fused gate_up, then down, in each of the 2 blocks


@pytest.mark.parametrize("family", ["Mixtral", "Llama4", "JetMoE"])
def test_deep_copy_runs_its_own_weights(family):
    import copy

    model = quiet_model(family)
    open_model(model, experts_implementation="moelab")
    twin = copy.deepcopy(model)
    embeds, _ = inputs(model)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds).logits
        torch.testing.assert_close(twin(inputs_embeds=embeds).logits, ref)
        for block in open_model(twin).blocks:
            block.down.zero_()  # the copy's experts only
        assert torch.equal(model(inputs_embeds=embeds).logits, ref)
        assert not torch.allclose(twin(inputs_embeds=embeds).logits, ref)


@pytest.mark.parametrize("family", ["Qwen2-MoE", "GPT-OSS", "Llama4"])
def test_a_permuting_dispatcher_gives_the_same_forward_and_backward(family):
    from moelab.nn import PermutingDispatcher

    eager, ours = quiet_model(family), quiet_model(family)
    enable_experts_backend(open_model(ours), dispatcher=PermutingDispatcher())
    embeds, dy = inputs(eager)
    y0, dx0, g0 = run(eager, embeds, dy)
    y1, dx1, g1 = run(ours, embeds, dy)
    close(y1, y0)
    close(dx1, dx0)
    for name in g0:
        close(g1[name], g0[name])


def test_open_a_checkpoint_with_the_moelab_backend(tiny_model_dir):
    """A path goes through from_pretrained(experts_implementation="moelab"), then the backend."""
    ids = torch.tensor([[1, 5, 9, 2]])
    eager = open_model(tiny_model_dir, experts_implementation="eager")
    view = open_model(tiny_model_dir, experts_implementation="moelab")
    assert view.model.config._experts_implementation == "moelab"
    assert all(experts_backend(b) is not None for b in view.blocks)
    with torch.no_grad():
        torch.testing.assert_close(view.model(ids).logits, eager.model(ids).logits)
