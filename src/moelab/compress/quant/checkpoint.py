"""Write quantised experts as checkpoints: dequantised (stock transformers) or compressed-tensors.

Shape legend: O output features, I input features, G groups (``I / group_size``), W int32 words.

**Dequantised**: the model with every routed expert replaced by ``(q - zero) * scale``, saved by
``save_pretrained`` (safetensors) with the tokenizer and ``quant.json`` (settings, bits per expert,
calibration tokens per expert). Any transformers loads it; it is as large as the original.

**compressed-tensors** (``format: pack-quantized``, the format llm-compressor writes and vLLM reads):
the same save, then each routed expert projection's ``<module>.weight [O, I]`` is replaced by

    weight_packed      int32 [O, ceil(I * bits / 32)]   codes + 2^(bits-1), densely packed: code i of a row
                                                        at bits i*bits .. i*bits + bits - 1 of the row's
                                                        little-endian bit stream (compressed-tensors >= 0.20)
    weight_scale       [O, G] in the model's dtype
    weight_zero_point  int32 [ceil(O * bits / 32), G]   (asymmetric only; packed along the output dim)
    weight_shape       int64 [2] = (O, I)

and ``config.json`` gets a ``quantization_config`` (``quant_method: compressed-tensors``) with one config
group targeting ``Linear``, as llm-compressor writes it for MoE models (vLLM's and SGLang's MoE kernels
read that group), and an ``ignore`` list naming every full-precision module: the LM head, routers,
shared experts and their gates, attention and dense MLPs. Checkpoint tensors are found
by value: transformers saves the experts in the checkpoint layout (per-expert ``experts.<e>.<proj>``
Linear weights for the families that ship that way), and each saved tensor equal to a dequantised
expert projection is replaced. Families whose checkpoint layout stores experts fused (one 3-D tensor per
projection, e.g. GPT-OSS) have no per-expert Linear module to target: they are refused with a message.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from moelab.compress.quant.common import QuantizedTensor
from moelab.compress.quant.quantize import QuantResult, dequantized_model
from moelab.data.atomic import atomic_dir
from moelab.errors import MoelabError
from moelab.models import ModelView, open_model

FORMATS = ("dequantized", "compressed-tensors")
_CT_VERSION = "0.20.1"


def pack_int32(q: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Dense packing of int8 codes ``[R, C]`` (in ``[-2^(bits-1), 2^(bits-1))``) into int32, along ``dim``."""
    v = q.to(torch.int64) + (1 << (bits - 1))
    if dim == 0:
        v = v.T
    R, C = v.shape
    words = math.ceil(C * bits / 32)
    pos = torch.arange(C, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    out = torch.zeros(R, words + 1, dtype=torch.int64)
    out.index_add_(1, word, (v << off) & 0xFFFFFFFF)
    spill = off + bits > 32
    if bool(spill.any()):
        out.index_add_(1, word[spill] + 1, v[:, spill] >> (32 - off[spill]))
    out = out[:, :words]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)  # two's complement
    return (out.T if dim == 0 else out).contiguous()


def unpack_int32(packed: Tensor, bits: int, n: int, dim: int = 1) -> Tensor:
    """Inverse of :func:`pack_int32`: int8 codes with ``n`` entries along ``dim``."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        p = p.T
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, off = pos // 32, pos % 32
    p = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.int64)], 1)
    v = ((p[:, word] >> off) | (p[:, word + 1] << (32 - off))) & ((1 << bits) - 1)
    out = (v - (1 << (bits - 1))).to(torch.int8)
    return (out.T if dim == 0 else out).contiguous()


def _digest(t: Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _expert_index(view: ModelView, result: QuantResult, dtype: torch.dtype) -> dict[str, list[tuple]]:
    """``digest of a dequantised projection -> [(block path, expert, proj, QuantizedTensor)]``."""
    index: dict[str, list[tuple]] = {}
    for b in view.blocks:
        for e, tensors in enumerate(result.blocks[b.layer].experts):
            for proj, qt in tensors.items():
                index.setdefault(_digest(qt.dequantize(dtype)), []).append((b.path, e, proj, qt))
    return index


def _ct_tensors(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, Tensor]:
    bits, O, I = qt.config.bits, qt.q.shape[0], qt.q.shape[1]  # noqa: E741
    out = {"weight_packed": pack_int32(qt.q.cpu(), bits), "weight_scale": qt.scale.to("cpu", dtype).contiguous(),
           "weight_shape": torch.tensor([O, I], dtype=torch.int64)}
    if not qt.config.symmetric:
        out["weight_zero_point"] = pack_int32(qt.zero.cpu(), bits, dim=0)
    return out


def _rewrite(folder: Path, index: dict[str, list[tuple]], dtype: torch.dtype) -> tuple[dict[int, list[str]], set[str]]:
    """Replace every saved expert projection weight with its compressed-tensors tensors. Returns the
    quantised module names by bit-width and the other modules with a 2-D ``weight`` (kept in full
    precision). Each (block, expert, proj) must be found exactly once."""
    files = sorted(folder.glob("*.safetensors"))
    found: dict[tuple, str] = {}
    kept: set[str] = set()
    weight_map: dict[str, str] = {}
    for f in files:
        sd, out = load_file(f), {}
        for key, t in sd.items():
            hits = index.get(_digest(t)) if key.endswith(".weight") and t.dim() == 2 else None
            free = [h for h in hits or () if h[:3] not in found]  # the saved name may differ from the module path
            hit = next((h for h in free if key.startswith(h[0] + ".")), free[0] if free else None)
            if hit is None:
                out[key] = t
                if key.endswith(".weight") and t.dim() == 2:
                    kept.add(key[: -len(".weight")])
                continue
            module = key[: -len(".weight")]
            found[hit[:3]] = module
            for name, v in _ct_tensors(hit[3], dtype).items():
                out[f"{module}.{name}"] = v
        save_file(out, f, metadata={"format": "pt"})
        weight_map.update({k: f.name for k in out})
    want = {h[:3] for hs in index.values() for h in hs}
    missing = sorted(want - set(found))
    if missing:
        raise MoelabError(f"format compressed-tensors: {len(missing)} expert projections (block, expert, proj) "
                          f"have no per-expert '<module>.weight' in the saved checkpoint, e.g. {missing[0]}: this "
                          f"family stores its experts fused (one tensor for all experts), which compressed-tensors "
                          f"cannot target; use --format dequantized")
    idx_file = folder / "model.safetensors.index.json"
    if idx_file.is_file():
        meta = json.loads(idx_file.read_text())
        meta["weight_map"] = weight_map
        idx_file.write_text(json.dumps(meta, indent=2) + "\n")
    by_bits: dict[int, list[str]] = {}
    for hs in index.values():
        for h in hs:
            by_bits.setdefault(h[3].config.bits, []).append(found[h[:3]])
    return by_bits, kept


def _ignore(view: ModelView, kept: set[str]) -> list[str]:
    """Every Linear-like module that stays in full precision, by its checkpoint name (``kept``: what vLLM
    matches) and by its module name in the loaded model (what transformers matches): attention, dense
    and shared MLPs, routers, shared-expert gates, the LM head."""
    out = set(kept) | {"lm_head"}
    for name, m in view.model.named_modules():
        if isinstance(m, torch.nn.Linear) or any(m is b.router_module for b in view.blocks):
            out.add(name)
    return sorted(out)


def ct_config(result: QuantResult, bits: int, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of a compressed-tensors pack-quantized checkpoint: one config group
    targeting ``Linear`` (the group vLLM's and SGLang's MoE kernels read, ``target_scheme_map["Linear"]``)
    and every full-precision module in ``ignore``."""
    c = result.spec.config
    weights = {"num_bits": bits, "type": "int", "symmetric": c.symmetric,
               "strategy": "channel" if c.group_size is None else "group", "group_size": c.group_size,
               "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None, "sparsity_config": {},
            "transform_config": {}, "global_compression_ratio": None, "version": _CT_VERSION}


def check_ct_loadable(result: QuantResult) -> None:
    """Refuse what stock transformers cannot load from a compressed-tensors checkpoint.

    transformers 5 fuses MoE experts on load (``experts.gate_up_proj [E, 2I, H]``) and dequantises
    compressed-tensors experts in ``CompressedTensorsDequantize`` (``integrations/compressed_tensors.py``):
    it rebuilds each expert from ``weight_packed``, ``weight_scale`` and ``weight_shape`` only (no
    ``weight_zero_point``, so asymmetric experts fail with "Asymmetric quant requires zero-point values"),
    with the one scheme ``get_experts_scheme`` picks for all experts (so mixed bit-widths would be
    unpacked with the wrong width)."""
    if not result.spec.config.symmetric:
        raise MoelabError("format compressed-tensors: asymmetric experts do not load in stock transformers 5 "
                          "(its fused-experts dequantiser drops weight_zero_point); use --sym, or --format "
                          "dequantized")
    bits = {b for qb in result.blocks.values() for b in qb.bits}
    if len(bits) > 1:
        raise MoelabError(f"format compressed-tensors: experts at mixed bit-widths {sorted(bits)} do not load in "
                          f"stock transformers 5 (it dequantises all fused experts with one scheme); use --format "
                          f"dequantized")


def save_quantized(view: ModelView, result: QuantResult, out_dir: str | os.PathLike, *,
                   format: str = "dequantized", tokenizer_from: Any = None, overwrite: bool = False) -> Path:
    """Write the quantised model to ``out_dir`` (atomically) as ``format`` 'dequantized' or
    'compressed-tensors' (see the module docstring); returns the folder."""
    from moelab.compress.apply import _copy_tokenizer

    if format not in FORMATS:
        raise MoelabError(f"format: {format!r}; expected one of {FORMATS}")
    if format == "compressed-tensors":
        check_ct_loadable(result)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MoelabError(f"out: {out} already exists; choose another folder or pass overwrite=True (--overwrite)")
    model = dequantized_model(view, result)
    dtype = next(model.parameters()).dtype
    from moelab.models.checkpoint import no_transformers_bars

    with atomic_dir(out) as tmp, no_transformers_bars():
        model.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(tokenizer_from, tmp)
        meta = result.meta() | {"format": format}
        if format == "compressed-tensors":
            by_bits, kept = _rewrite(tmp, _expert_index(view, result, dtype), dtype)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["quantization_config"] = ct_config(result, next(iter(by_bits)), _ignore(open_model(model), kept))
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "quant.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weights (``*.safetensors``) in ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


__all__ = ["FORMATS", "check_ct_loadable", "checkpoint_bytes", "ct_config", "pack_int32", "save_quantized", "unpack_int32"]
