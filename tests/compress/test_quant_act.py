"""Per-token activation fake-quantisation: the formula by hand, the error bound, 16 bits ~ identity, and the
experts backend's inputs transform against a slow per-slot reference on tiny models of several families."""

from __future__ import annotations

import pytest
import torch

from moelab.compress.quant.act import ActQuantConfig, fake_quant_per_token, install_act_quant
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.reference import expert_input, glu_activation, reference_route
from moelab.models.tiny import native_block_output

from .conftest import make_strong


def test_fake_quant_matches_a_hand_computation():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 0.0, 0.2]], dtype=torch.float64)
    # 4 bits: qmax 7. Row 0: scale 4/7, x/scale = [1.75, -3.5, 0.875, 7] -> [2, -4 (half to even), 1, 7].
    # Row 1: zeros stay zeros. Row 2: scale 3/7, x/scale = [-7, 2.333, 0, 0.467] -> [-7, 2, 0, 0].
    want = torch.tensor([[8 / 7, -16 / 7, 4 / 7, 4.0], [0.0, 0.0, 0.0, 0.0], [-3.0, 6 / 7, 0.0, 0.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(fake_quant_per_token(x, 4), want, rtol=0, atol=1e-15)
    # 8 bits: qmax 127; row 0 scale 4/127, 0.5 / scale = 15.875 -> 16 -> 64/127
    torch.testing.assert_close(fake_quant_per_token(x[:1], 8)[0, 2], torch.tensor(64 / 127, dtype=torch.float64),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fake_quant_error_bound_and_16_bits(bits):
    x = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(bits)) * 3
    y = fake_quant_per_token(x, bits)
    scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((y - x).abs() <= scale / 2 + 1e-12).all()
    torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-14, atol=0)  # the row's max is kept
    assert y.dtype == x.dtype
    if bits == 16:
        assert float((y - x).abs().max()) < 1e-4 * float(x.abs().max())
    else:
        assert float((y - x).abs().max()) > 1e-6  # it does quantise


def test_act_config_refuses_unsupported_bits():
    with pytest.raises(MoelabError, match=r"act_bits: 5 is not supported; expected one of \(4, 8, 16\)"):
        ActQuantConfig(5)
    with pytest.raises(MoelabError, match="act where"):
        ActQuantConfig(8, where=("attention",))


def _slow_block(block, x_TH, bits):
    """Slot by slot: y_t = sum_k w_tk down_e(fq(act(gate_e fq(x_t), up_e fq(x_t)))) (+ shared), float64."""
    x_TH = x_TH.to(torch.float64)
    _, ids_TK, w_TK = reference_route(block, x_TH)
    y_TH = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(ids_TK.shape[1]):
            e, w = int(ids_TK[t, k]), w_TK[t, k]
            xi = fake_quant_per_token(expert_input(block, x_TH[t:t + 1], w[None]), bits)
            g = xi @ block.gate[e].double().T
            u = xi @ block.up[e].double().T
            a = fake_quant_per_token(glu_activation(block.act, g, u), bits)
            o = a @ block.down[e].double().T
            y_TH[t] += (o[0] * w) if block.combine == "output" else o[0]
    sh = block.shared  # full-precision activations: only the routed experts are quantised
    if sh is not None:
        y_sh = glu_activation(sh.act, x_TH @ sh.gate.double().T, x_TH @ sh.up.double().T) @ sh.down.double().T
        if sh.gate_weight is not None:
            y_sh = y_sh * torch.sigmoid(x_TH @ sh.gate_weight.double().T)
        y_TH += y_sh
    return y_TH


@pytest.mark.parametrize("family", ["Qwen3-MoE", "DeepSeek-V3", "Llama4"])
@torch.no_grad()
def test_backend_inputs_transform_matches_slow_reference(family):
    model = make_strong(family)
    view = open_model(model)
    block = view.blocks[0]
    x = torch.randn(1, 7, block.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = native_block_output(block, x)
    with install_act_quant(model, ActQuantConfig(4)):
        got = native_block_output(open_model(model).blocks[0], x)
    x_TH = x.reshape(-1, block.hidden_size)
    # 1e-6: the families' routers take their softmax/sigmoid in float32; A4 moves outputs by > 1e-4
    torch.testing.assert_close(got.reshape(x_TH.shape), _slow_block(block, x_TH, 4), rtol=1e-6, atol=1e-6)
    assert float((got - before).abs().max()) > 1e-4  # A4 changes the output
    # removed: the model is back to its own experts implementation, outputs as before
    torch.testing.assert_close(native_block_output(open_model(model).blocks[0], x), before, rtol=0, atol=0)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids).logits
    with install_act_quant(model, ActQuantConfig(16)):
        q16 = model(input_ids=ids).logits
    torch.testing.assert_close(q16, ref, rtol=1e-4, atol=1e-4)  # 16 bits: practically the identity


@torch.no_grad()
def test_act_quant_on_an_offloaded_model_keeps_its_weights_provider(tmp_path):
    """On a model whose experts are offloaded, act quant sets the backend's inputs transform and
    leaves the offloading provider in place: the same logits as act quant on the resident model."""
    from moelab.offload import offload_model

    model = make_strong("Qwen3-MoE").float()
    model.save_pretrained(tmp_path)
    offloaded, experts = offload_model(tmp_path, budget=1.0)
    resident = open_model(tmp_path, experts_implementation="moelab").model
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    plain = offloaded(input_ids=ids).logits
    with install_act_quant(resident, ActQuantConfig(4)):
        want = resident(input_ids=ids).logits
    misses = experts.stats().misses
    with install_act_quant(offloaded, ActQuantConfig(4)):
        got = offloaded(input_ids=ids).logits
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert experts.stats().hits > 0 and experts.stats().misses == misses  # still through the cache
    assert torch.equal(offloaded(input_ids=ids).logits, plain)  # removed: the provider stays
    experts.close()
