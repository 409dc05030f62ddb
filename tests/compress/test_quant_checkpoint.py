"""Quantised checkpoints: int32 packing, the dequantised stock checkpoint, and compressed-tensors checkpoints
loaded by stock transformers (with the compressed-tensors package) giving moelab's logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from moelab.compress.quant import (
    CalibPolicy,
    QuantConfig,
    QuantSpec,
    dequantized_model,
    quantize_experts,
)
from moelab.compress.quant.checkpoint import (
    checkpoint_bytes,
    pack_int32,
    save_quantized,
    unpack_int32,
)
from moelab.errors import MoelabError
from moelab.models import load_checkpoint, open_model

from .conftest import make_strong
from .test_quant_calibrate import _calib


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_matches_compressed_tensors(bits):
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (5, 37), generator=gen, dtype=torch.int8)  # 37: words straddle rows' ends
    for dim in (0, 1):
        p = pack_int32(q, bits, dim)
        assert p.dtype == torch.int32
        assert torch.equal(unpack_int32(p, bits, q.shape[dim], dim), q)
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    assert torch.equal(pack_int32(q, bits), ct.pack_to_int32(q, bits))
    assert torch.equal(pack_int32(q, bits, 0), ct.pack_to_int32(q, bits, packed_dim=0))


def _quantized(family: str, cfg: QuantConfig, method: str = "gptq"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = open_model(make_strong(family, dtype=torch.float32))
    res = quantize_experts(view, QuantSpec(method, cfg, policy=CalibPolicy(min_tokens=4)),
                           _calib(view.config.vocab_size))
    return view, res


def test_dequantized_checkpoint_loads_with_stock_loader(tmp_path):
    view, res = _quantized("Qwen3-MoE", QuantConfig(4, 8, False))
    out = save_quantized(view, res, tmp_path / "deq")
    meta = json.loads((out / "quant.json").read_text())
    assert meta["calibration"]["uncalibrated"] == 0 and meta["bits"] == 4
    loaded = load_checkpoint(out)
    ids = torch.randint(0, view.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, dequantized_model(view, res)(input_ids=ids).logits,
                                   rtol=0, atol=0)
    with pytest.raises(MoelabError, match="already exists"):
        save_quantized(view, res, out)


@pytest.mark.parametrize("family,cfg", [("Qwen3-MoE", QuantConfig(4, 8)), ("Mixtral", QuantConfig(8, None)),
                                        ("DeepSeek-V3", QuantConfig(3, 8)), ("Qwen2-MoE", QuantConfig(2, 8))])
def test_compressed_tensors_checkpoint_loads_in_stock_transformers(tmp_path, family, cfg):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    view, res = _quantized(family, cfg)
    out = save_quantized(view, res, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]  # what vLLM's MoE kernels read
    names = {id(m): n for n, m in view.model.named_modules()}
    linear = {n for n, m in view.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"lm_head", *linear, *(names[id(b.router_module)] for b in view.blocks)} <= set(qc["ignore"])
    assert not [n for n in qc["ignore"] if ".experts." in n and not n.endswith("shared_experts")]
    assert checkpoint_bytes(out) < checkpoint_bytes(save_quantized(view, res, tmp_path / "deq"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, view.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = dequantized_model(view, res)(input_ids=ids).logits
        got = stock(input_ids=ids).logits
    # compressed-tensors dequantises (q - z) * s in float32 as moelab does: the same weights, so the
    # same logits up to float32 summation order
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_compressed_tensors_refusals_are_named(tmp_path):
    view, res = _quantized("Qwen3-MoE", QuantConfig(4, 8, False), "rtn")
    with pytest.raises(MoelabError, match="asymmetric"):
        save_quantized(view, res, tmp_path / "a", format="compressed-tensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gv = open_model(make_strong("GPT-OSS", dtype=torch.float32))
    gres = quantize_experts(gv, QuantSpec("rtn", QuantConfig(4, 8)))
    with pytest.raises(MoelabError, match="stores its experts fused"):
        save_quantized(gv, gres, tmp_path / "g", format="compressed-tensors")
    assert not (tmp_path / "g").exists()
    with pytest.raises(MoelabError, match="format: 'gguf'"):
        save_quantized(view, res, tmp_path / "x", format="gguf")
