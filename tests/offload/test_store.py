"""The expert store reads one expert's rows by offset, equal to the resident model's parameters."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from moelab.errors import CheckpointError
from moelab.models import open_model
from moelab.models.backend import spec_for
from moelab.models.checkpoint import load_meta_model
from moelab.models.open import view_model
from moelab.models.tiny import TINY_CONFIGS
from moelab.offload.store import ExpertStore, SafetensorsIndex

from .conftest import FAMILIES, save_tiny


def open_store(path):
    meta = load_meta_model(path)
    return ExpertStore(path, meta, view_model(meta))


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_equal_resident_parameters(tiny_dirs, family):
    path = tiny_dirs[family]
    resident = open_model(path)
    store = open_store(path)
    for block in resident.blocks:
        for e in (0, block.num_experts - 1):
            before = store.bytes_read
            rows = store.read(block.layer, e)
            assert store.bytes_read - before == store.expert_bytes(block.layer)  # only its bytes
            # into given tensors (a cache slot): read in place where stored whole, else copied
            out = {n: torch.full_like(t, float("nan")) for n, t in rows.items()}
            assert store.read(block.layer, e, out=out) == out
            if family in ("Mixtral", "Qwen3-MoE", "GPT-OSS"):  # per-expert pieces / stacked
                assert all(store._read_into(store.sources[(block.layer, n)][e], t) is not None
                           for n, t in out.items())
            for name in spec_for(block).params:
                p = block.module.get_parameter(name)
                r = p.shape[0] // block.num_experts
                assert torch.equal(rows[name], p.detach()[e * r:(e + 1) * r]), (name, e)
                assert torch.equal(out[name], rows[name]), (name, e)
    assert store.total_expert_bytes() == sum(b.expert_params() for b in resident.blocks) * 4
    store.close()


def test_index_reads_row_ranges_by_offset(tiny_dirs):
    index = SafetensorsIndex(tiny_dirs["GPT-OSS"])
    name = next(n for n in index.entries if n.endswith("experts.gate_up_proj"))
    whole = index.read(name)
    assert torch.equal(index.read(name, (1, 3)), whole[1:3])
    assert index.bytes_read == whole.nbytes * (1 + 2 / whole.shape[0])
    with pytest.raises(CheckpointError, match="rows"):
        index.read(name, (2, 99))
    into = torch.empty_like(whole[1:3])
    assert index.read(name, (1, 3), out=into) is into and torch.equal(into, whole[1:3])
    with pytest.raises(ValueError, match="expected a contiguous CPU"):
        index.read(name, (1, 3), out=torch.empty_like(whole[1:4]))
    index.close()


def test_truncated_file_is_named_when_opened(tiny_dirs, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["Qwen3-MoE"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated or corrupt"):
        SafetensorsIndex(bad)


def _drop_tensor(src, dst, drop: str):
    """Copy a checkpoint without tensor ``drop`` (a rewritten header; the data stays as it was)."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    del header[drop]
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize(("family", "drop"), [
    ("Mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
    ("Qwen3-MoE", "model.layers.0.mlp.experts.5.down_proj.weight"),
])
def test_missing_expert_tensor_is_named(tiny_dirs, tmp_path, family, drop):
    dst = tmp_path / "missing"
    _drop_tensor(tiny_dirs[family], dst, drop)
    with pytest.raises(CheckpointError, match=rf"expert \d+ of layer \d+ is missing.*{drop}"):
        open_store(dst)


def test_missing_stacked_expert_tensor_is_named(tiny_dirs, tmp_path):
    dst = tmp_path / "missing"
    _drop_tensor(tiny_dirs["GPT-OSS"], dst, "model.layers.1.mlp.experts.down_proj_bias")
    with pytest.raises(CheckpointError, match=r"no tensor for the expert parameter "
                                              r"model.layers.1.mlp.experts.down_proj_bias"):
        open_store(dst)


def test_shape_contradicting_config_is_named(tmp_path):
    path = save_tiny("Qwen3-MoE", tmp_path / "a")
    cfg = json.loads((path / "config.json").read_text())
    cfg["moe_intermediate_size"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit|config.json"):
        open_store(path)


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_every_family_declares_its_expert_parameters(family):
    from moelab.models.backend import own_params
    from moelab.models.tiny import tiny_view

    view = tiny_view(family)
    for block in view.blocks:
        spec = spec_for(block)
        tensors = own_params(block, spec.params)
        assert all(t.shape[0] % block.num_experts == 0 for t in tensors.values())
        want, got = spec.weights(block), spec.from_params(block, tensors)
        for a, b in zip(want.as_tuple(), got.as_tuple(), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        # the rows of experts 1 and 2 alone give those experts' weights
        rows = {n: t[t.shape[0] // block.num_experts * 1: t.shape[0] // block.num_experts * 3]
                for n, t in tensors.items()}
        two = spec.from_params(block, rows)
        assert torch.equal(two.up, want.up[1:3]) and torch.equal(two.down, want.down[1:3])
