"""load_by_offset (what load_checkpoint uses for MoE families): the model from_pretrained loads, in one copy."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from moelab.models.checkpoint import load_checkpoint
from moelab.models.open import view_model
from moelab.models.tiny import TINY_CONFIGS
from moelab.offload.outofcore import load_by_offset

from .conftest import save_tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_equals_from_pretrained(family, dtype, tmp_path):
    path = save_tiny(family, tmp_path / "m", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(path).eval()
    got = load_checkpoint(path)
    assert type(got) is type(ref)
    a, b = dict(got.named_parameters()), dict(ref.named_parameters())
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    bufs = dict(ref.named_buffers())
    for k, t in got.named_buffers():
        assert t.dtype == bufs[k].dtype and torch.equal(t, bufs[k]), k
    assert got.config._experts_implementation == ref.config._experts_implementation
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_every_expert_is_read_once_by_offset(tmp_path, monkeypatch):
    from moelab.offload.store import ExpertStore, SafetensorsIndex

    path = save_tiny("DeepSeek-V3", tmp_path / "m")  # a dense first layer, shared experts
    reads, whole = [], []
    real_read, real_index_read = ExpertStore.read, SafetensorsIndex.read
    monkeypatch.setattr(ExpertStore, "read", lambda self, layer, e: reads.append((layer, e)) or real_read(self, layer, e))
    monkeypatch.setattr(SafetensorsIndex, "read", lambda self, name, rows=None: whole.append(name) or real_index_read(self, name, rows))
    model = load_by_offset(path)
    assert sorted(reads) == sorted(set(reads))  # once each
    assert len(reads) == sum(b.num_experts for b in view_model(model).blocks)
    assert len(whole) == len(set(whole))  # no tensor read twice
    assert all(not t.is_meta for t in model.state_dict().values())
