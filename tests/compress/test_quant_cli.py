"""``moelab quantize`` on the tiny Qwen3-MoE saved with the embedded corpus' tokenizer: outputs and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from .test_cli import assert_error, run

CALIB = ("--calib-tokens", 256, "--seq-len", 32)


def test_quantize_gptq_writes_a_compressed_tensors_checkpoint(tiny_model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    res = run("quantize", tiny_model_dir, "--method", "gptq", "--bits", 4, "--group", 8, "--format",
              "compressed-tensors", *CALIB, "--min-tokens", 200, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "0 uncalibrated experts" in res.output and "4.00 bits per expert weight" in res.output
    meta = json.loads((out / "quant.json").read_text())
    cal = meta["calibration"]
    # min-tokens 200 of 256: the experts routed fewer were recalibrated on all 256 tokens
    for layer in cal["layers"]:
        for r, u, s in zip(layer["routed_tokens"], layer["used_tokens"], layer["source"], strict=True):
            assert (s, u) == (("routed", r) if r >= 200 else ("all tokens", 256))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert AutoModelForCausalLM.from_pretrained(out)(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_quantize_rtn_dequantized(tiny_model_dir, tmp_path):
    res = run("quantize", tiny_model_dir, "--method", "rtn", "--bits", 8, "--group", 0, "--asym",
              "--out", tmp_path / "r", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "rtn int8 asym per-channel" in res.output and "calibration:" not in res.output


def test_quantize_bad_input(tiny_model_dir, tmp_path):
    out = ("--out", tmp_path / "x", "--no-progress")
    assert_error(run("quantize", tiny_model_dir, "--bits", 5, *out), "bits: 5", "(2, 3, 4, 8)")
    assert_error(run("quantize", tiny_model_dir, "--method", "rtn", "--group", 5, *out),
                 "group_size: 5 does not divide the input dimension 16")
    assert_error(run("quantize", tiny_model_dir, "--method", "rtn", "--group", 8, "--asym", "--format",
                     "compressed-tensors", *out), "asymmetric")
    quantized = tmp_path / "already"
    shutil.copytree(tiny_model_dir, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    assert_error(run("quantize", quantized, "--group", 8, *out), "already quantised", "compressed-tensors")
    other = tmp_path / "corpus"
    other.mkdir()
    (other / "a.txt").write_text("some text " * 50)
    (other / "tokenizer.json").write_text("{}")
    assert_error(run("quantize", tiny_model_dir, "--group", 8, "--calib", other, *out),
                 "tokenised for another model")
    assert not (tmp_path / "x").exists()


def test_quantize_pmq_mixed_precision(tiny_model_dir, tmp_path):
    out = tmp_path / "p"
    res = run("quantize", tiny_model_dir, "--method", "gptq", "--group", 8, "--avg-bits", 2.5, "--allocate", "pmq",
              *CALIB, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "gptq + pmq (budget 2.5 bits, from [2, 3, 4])" in res.output and "0 uncalibrated experts" in res.output
    meta = json.loads((out / "quant.json").read_text())
    assert 2.0 <= meta["average_bits"] <= 2.5
    for bits in meta["bits_per_expert"].values():
        assert sum(bits) <= 2.5 * len(bits)
    assert_error(run("quantize", tiny_model_dir, "--group", 8, "--avg-bits", 1.5, "--out", tmp_path / "y",
                     "--no-progress"), "avg_bits: 1.5 is below the smallest bit-width 2")
    assert_error(run("quantize", tiny_model_dir, "--group", 8, "--avg-bits", 2.5, "--format", "compressed-tensors",
                     "--out", tmp_path / "z", "--no-progress"), "mixed bit-widths")


def test_quantize_eaquant_w4a4(tiny_model_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ea"
    res = run("quantize", tiny_model_dir, "--method", "eaquant", "--bits", 4, "--act-bits", 4, "--group", 8,
              "--format", "compressed-tensors", *CALIB, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "eaquant int4 sym group 8, activations A4 per-token (simulated, not stored)" in res.output
    assert "router alignment, layer 1: KL(full precision || quantised routing)" in res.output
    assert "0 uncalibrated experts" in res.output
    meta = json.loads((out / "quant.json").read_text())
    assert meta["method"] == "eaquant" and meta["act_bits"] == 4 and meta["cap"] >= 1
    a = meta["alignment"]["1"]
    assert a["kl_after"] <= a["kl_before"]
    # the smoothed norms and aligned routers travel in the checkpoint; stock transformers loads it
    assert AutoModelForCausalLM.from_pretrained(out)(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_quantize_act_bits_with_gptq_and_bad_act_bits(tiny_model_dir, tmp_path):
    res = run("quantize", tiny_model_dir, "--method", "gptq", "--act-bits", 8, "--group", 8, *CALIB,
              "--out", tmp_path / "g", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "activations A8 per-token" in res.output
    assert json.loads((tmp_path / "g" / "quant.json").read_text())["act_bits"] == 8
    bad = run("quantize", tiny_model_dir, "--act-bits", 5, "--out", tmp_path / "x", "--no-progress")
    assert bad.exit_code == 2 and "--act-bits" in bad.output and "5" in bad.output
    assert not (tmp_path / "x").exists()
