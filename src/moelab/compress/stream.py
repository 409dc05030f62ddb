"""Writing a compressed checkpoint layer by layer: :func:`write_plan`, the out-of-core ``apply_plan``.

Shape legend: E experts of the original layer, E' of the compressed one, I expert width, H hidden.

:func:`moelab.compress.apply.apply_plan` builds the whole compressed model in memory, and
``save_pretrained`` then copies it once more into bytes: with the original loaded, three copies of
the experts. :func:`write_plan` writes the same checkpoint without building the compressed model:

1. the compressed model is built on the meta device (:func:`~moelab.compress.apply.meta_like_old`),
   and its saved layout (names, dtypes, shapes) comes from it (:func:`moelab.models.writer.saved_layout`);
2. one decoder layer at a time, the tensors that change (the MoE block's routers and experts) are
   computed by materialising that block alone and writing the plan into it with the same code as
   ``apply_plan`` (:func:`~moelab.compress.apply.write_block`), each output expert built from its
   members' tensors as ``expert_rows(block, e)`` gives them; every other tensor is the original
   model's, unchanged;
3. the layer's tensors are written at their offsets (:class:`moelab.models.writer.SafetensorsWriter`)
   and the block goes back to the meta device.

``expert_rows`` is where the original experts come from: the view's own tensors
(:func:`~moelab.compress.apply.view_expert`, a model in memory), or the checkpoint's safetensors
read by offset (:func:`store_expert`, a model opened by :func:`moelab.offload.offload_model`, whose
experts are never all in memory). Peak memory beyond the original model: one compressed MoE block.
The files equal ``save_compressed(apply_plan(view, plan), plan, out)``'s tensor for tensor (tested).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.compress.apply import (
    ExpertRows,
    _tensors,
    block_storages,
    check_out_dir,
    layer_plan,
    meta_like_old,
    plan_config,
    view_expert,
    write_block,
    write_extras,
)
from moelab.compress.plan import Plan, PlanError
from moelab.data.atomic import atomic_dir
from moelab.models import ModelView, MoEBlockView
from moelab.models.open import view_model
from moelab.models.writer import (
    SHARD_BYTES,
    ShardedWriter,
    layer_chunks,
    savable_state,
    save_config_files,
    saved_layout,
)
from moelab.trace.progress import token_progress

WEIGHTS_NAME = "model.safetensors"


def store_expert(store: Any) -> ExpertRows:
    """:data:`~moelab.compress.apply.ExpertRows` reading expert e of a block from ``store`` (a
    :class:`moelab.offload.ExpertStore`) by offset: one expert in memory at a time."""
    from moelab.models.backend import spec_for

    def rows(block: MoEBlockView, e: int) -> dict[str, Tensor | None]:
        w = spec_for(block).from_params(block, store.read(block.layer, e))
        return {n: (None if t is None else t[0]) for n, t in zip(
            ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"), w.as_tuple(), strict=True)}

    return rows


def write_plan(view: ModelView, plan: Plan, out_dir: str | os.PathLike, *,
               expert_rows: ExpertRows = view_expert, tokenizer_from: Any = None,
               overwrite: bool = False, progress: bool = False,
               max_shard_bytes: int = SHARD_BYTES) -> tuple[Path, int]:
    """Write ``plan`` applied to ``view``'s model as a stock checkpoint in ``out_dir``: ``(out, params)``,
    ``params`` the compressed model's parameter count.

    The folder (``model.safetensors``, or shards of at most ``max_shard_bytes`` with their index as
    ``save_pretrained`` writes them, ``config.json``, ``generation_config.json``, ``plan.json``,
    the tokenizer files of ``tokenizer_from``) is written under a temporary name and renamed when
    complete. ``progress``: a bar over the chunks written (a decoder layer each). Raises
    PlanError / MoelabError as :func:`~moelab.compress.apply.apply_plan` and
    :func:`~moelab.compress.apply.save_compressed` do.
    """
    out = check_out_dir(out_dir, overwrite)
    new_model = meta_like_old(view.model, plan_config(view, plan))
    new_model.tie_weights()
    chunks = layer_chunks(list(savable_state(new_model)))
    old = _tensors(view.model)
    with atomic_dir(out) as tmp, token_progress(len(chunks), enabled=progress, label="writing",
                                                unit="tensor groups") as advance:
        with ShardedWriter(tmp, saved_layout(new_model), max_shard_bytes) as writer:
            for keys in chunks:
                writer.write_model_chunk(new_model, _chunk(view, new_model, plan, keys, old, expert_rows))
                advance(1)
        save_config_files(new_model, tmp)
        write_extras(tmp, plan, tokenizer_from)
    return out, sum(p.numel() for p in new_model.parameters())


def _chunk(view: ModelView, new_model: nn.Module, plan: Plan, keys: list[str], old: dict[str, Tensor],
           expert_rows: ExpertRows) -> dict[str, Tensor]:
    """The compressed model's tensors ``keys`` (one decoder layer): unchanged ones from the original,
    the MoE block's from a materialised copy of that block with the plan written into it."""
    blocks = {b.path: b for b in view_model(new_model).blocks}
    out: dict[str, Tensor] = {}
    for path in {p for p in blocks if any(k.startswith(p + ".") for k in keys)}:
        out.update(_block_tensors(view, new_model, blocks[path], plan, old, expert_rows))
    for k in keys:
        if k not in out:
            out[k] = _unchanged(k, new_model, old)
    return {k: out[k] for k in keys}


def _unchanged(key: str, new_model: nn.Module, old: dict[str, Tensor]) -> Tensor:
    want = new_model.get_parameter_or_buffer(key)
    src = old.get(key)
    if src is None or src.shape != want.shape or src.is_meta:
        why = "is not in memory" if src is not None and src.is_meta else "changed shape"
        raise PlanError(f"write_plan: {key} ({tuple(want.shape)}) {why} but is not an expert or router "
                        f"tensor of the model view; this family's layout is not handled")
    return src.detach().to(want.dtype)


@torch.no_grad()
def _block_tensors(view: ModelView, new_model: nn.Module, new_meta: MoEBlockView, plan: Plan,
                   old: dict[str, Tensor], expert_rows: ExpertRows) -> dict[str, Tensor]:
    """Materialise one compressed block, copy its unchanged tensors, write the plan into it; its
    tensors by model key (the block then goes back to the meta device: the tensors stay valid)."""
    module = new_meta.module
    module.to_empty(device=view.blocks[0].router_weight.device)
    try:
        nb = next(b for b in view_model(new_model).blocks if b.path == new_meta.path)
        written = block_storages([nb])
        mine = {f"{nb.path}.{n}": t for n, t in _tensors(module).items()}
        for key, t in mine.items():
            if t.untyped_storage().data_ptr() not in written:
                t.copy_(_unchanged(key, new_model, old))
        ob = view.block(nb.layer)
        write_block(nb, ob, layer_plan(plan, ob), expert_rows)
        state = {f"{nb.path}.{k}": v for k, v in module.state_dict().items()}
    finally:
        module.to_empty(device="meta")
    return state


__all__ = ["WEIGHTS_NAME", "store_expert", "write_plan"]
