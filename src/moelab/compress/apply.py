"""Apply a :class:`~moelab.compress.plan.Plan` to a model: a stock transformers model with E' experts.

Shape legend: E experts of the original layer, E' of the compressed one, I expert width, H hidden,
M members of one output expert.

Output expert ``o`` of a compressed layer is built in weight space (see :mod:`moelab.compress.plan`)::

    gate'[o][n, :] = sum_m c_m[n] * gate[m][p_m[n], :]      (up, gate_bias, up_bias likewise)
    down'[o][:, n] = sum_m c_m[n] * down[m][:, p_m[n]]      down_bias'[o] = sum_m mean(c_m) * down_bias[m]
    neurons with neuron_mask False are zeroed in gate', up', down' (and the gate/up biases)
    router row / router bias / correction bias of o = those of ``router_from``

How it is written, the same for every family: the config is copied with the expert count (and
top-k, groups) edited by the family adapter (``FamilyAdapter.write_config``), a fresh model of the same class is built from it, every tensor whose shape
is unchanged is copied, and the experts and routers are written through the new model's
:class:`~moelab.models.MoEBlockView` (whose tensors are views of the model's own storage, in every
family's layout). A check then proves every parameter and buffer of the new model was written.

Decisions (also in :func:`routing_settings`):
    * stock configs hold one expert count for all layers, so every MoE layer needs the same E'.
      Unequal counts (a 'global' budget) are refused with a :class:`PlanError` naming the layers;
      evaluate such plans without writing them with :func:`moelab.compress.simulate.masked_logits`.
    * a family whose stock config cannot change the expert count or top-k (``FamilyAdapter.
      fixed_routing``; JetMoE shares both with its attention experts) refuses plans that change
      either (merges that keep E experts and neuron masks are applied).
    * top-k becomes ``plan.top_k`` or ``min(top_k, E')`` (a :class:`CompressWarning` when clamped).
      PhiMoE's SparseMixer always routes to 2 experts, so it needs E' >= 2.
    * group-limited routing (DeepSeek-V2/V3, GLM4 with ``n_group > 1``) keeps its groups only when
      every layer keeps the group structure (E' divisible by n_group, output expert o's router row
      comes from original group ``o // (E'/n_group)``, enough experts per group); otherwise groups
      are switched off (``n_group = topk_group = 1``) with a warning. Either way the change is
      recorded in ``plan.meta["apply"]``.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.compress.plan import LayerPlan, OutExpert, Plan, PlanError
from moelab.data.atomic import atomic_dir
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, open_model
from moelab.models.registry import adapter_named

_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


class CompressWarning(UserWarning):
    """A compressed model's routing differs from the original beyond the removed experts."""


@dataclass
class RoutingSettings:
    """The routing of the compressed model: one expert count, top-k and groups for all layers."""

    num_experts: int
    top_k: int
    n_group: int | None  # None: no group-limited routing
    topk_group: int | None
    notes: list[str] = field(default_factory=list)


def check_plan(view: ModelView, plan: Plan) -> None:
    """Validate ``plan`` against the model of ``view`` (layers, member ids, shapes); raise PlanError."""
    plan.validate({b.layer: b.num_experts for b in view.blocks},
                  {b.layer: b.intermediate_size for b in view.blocks})


def layer_plan(plan: Plan, block: MoEBlockView) -> LayerPlan:
    """The layer's plan, or the identity plan for a layer the plan leaves unchanged."""
    return plan.layers.get(block.layer) or LayerPlan.keep(block.layer, list(range(block.num_experts)))


def _groups_kept(block: MoEBlockView, lp: LayerPlan, top_k: int) -> bool:
    G, E, E2 = block.n_group, block.num_experts, lp.num_experts
    if E2 % G:
        return False
    per_new, per_old = E2 // G, E // G
    if block.group_score == "top2_sum" and per_new < 2:
        return False
    if top_k > block.topk_group * per_new:
        return False
    return all(src // per_old == o // per_new for o, src in enumerate(lp.sources()))


def routing_settings(view: ModelView, plan: Plan) -> RoutingSettings:
    """Expert count, top-k and groups of the compressed model (see the module docstring)."""
    counts = {b.layer: layer_plan(plan, b).num_experts for b in view.blocks}
    if len(set(counts.values())) > 1:
        raise PlanError(
            f"plan {plan.method!r}: a stock {type(view.model).__name__} config holds one expert count for "
            f"all layers, but the plan gives layer -> experts {counts}; use budget='layer' (equal counts) "
            f"or evaluate the plan unapplied with moelab.compress.simulate.masked_logits")
    E2 = next(iter(counts.values()))
    first = view.blocks[0]
    fixed = adapter_named(view.family).fixed_routing
    if fixed and (E2 != first.num_experts or (plan.top_k or first.top_k) != first.top_k):
        raise PlanError(f"plan {plan.method!r}: {fixed}, so a stock {view.family} checkpoint cannot have "
                        f"fewer experts or another top-k; keep all {first.num_experts} (merge within the count, "
                        f"neuron masks) or evaluate the plan with moelab.compress.simulate.masked_logits")
    notes = []
    if plan.top_k is not None:
        if plan.top_k > E2:
            raise PlanError(f"plan top_k: {plan.top_k} is more than the {E2} experts the plan keeps")
        top_k = plan.top_k
    else:
        top_k = min(first.top_k, E2)
        if top_k < first.top_k:
            notes.append(f"top_k clamped from {first.top_k} to {top_k}: only {E2} experts are left")
    if first.scoring == "sparsemixer" and E2 < 2:
        raise PlanError(f"plan {plan.method!r}: PhiMoE's SparseMixer routing always picks 2 experts; "
                        f"the plan keeps {E2}")
    n_group, topk_group = first.n_group, first.topk_group
    if n_group is not None:
        if not all(_groups_kept(b, layer_plan(plan, b), top_k) for b in view.blocks):
            notes.append(f"group-limited routing switched off (n_group {n_group} -> 1): the plan does not "
                         f"keep {n_group} equal groups of experts in every layer")
            n_group, topk_group = None, None
    return RoutingSettings(E2, top_k, n_group, topk_group, notes)


def compressed_config(view: ModelView, rs: RoutingSettings) -> Any:
    """A copy of the model's config with the expert count, top-k and groups of ``rs``, written by
    the family adapter."""
    adapter = adapter_named(view.family)
    if adapter.write_config is None:
        raise MoelabError(f"{view.family}: moelab cannot write this family's config with another expert "
                          f"count (its adapter has no write_config)")
    return adapter.write_config(view.model.config, rs.num_experts, rs.top_k, rs.n_group)


def _perm(member_perm: Tensor | None, I: int) -> Tensor:  # noqa: E741
    return torch.arange(I) if member_perm is None else member_perm.long().cpu()


def _coef(c: float | Tensor, I: int) -> Tensor:  # noqa: E741
    return c.to(torch.float64).cpu() if isinstance(c, Tensor) else torch.full((I,), float(c), dtype=torch.float64)


_EXPERT_TENSORS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")

# expert_rows(block, e) -> expert e's tensors in the view's convention: gate/up [I, H], down [H, I],
# biases [I] / [H] or None. The default reads the view; out of core they come from the safetensors.
ExpertRows = Callable[[MoEBlockView, int], dict[str, Tensor | None]]


def view_expert(block: MoEBlockView, e: int) -> dict[str, Tensor | None]:
    """The default :data:`ExpertRows`: expert ``e``'s tensors from the block view (no copy)."""
    return {n: (None if getattr(block, n) is None else getattr(block, n)[e]) for n in _EXPERT_TENSORS}


def build_expert(block: MoEBlockView, out: OutExpert, expert_rows: ExpertRows = view_expert) -> dict[str, Tensor]:
    """Weight-space tensors of one output expert (float64): gate/up ``[I, H]``, down ``[H, I]``, biases.

    ``expert_rows`` gives each member's tensors (default: the view's own)."""
    I = block.intermediate_size  # noqa: E741
    res: dict[str, Tensor] = {}
    for m in out.members:
        f64 = {n: (None if t is None else t.detach().to(torch.float64).cpu())
               for n, t in expert_rows(block, m.expert).items()}
        p, c = _perm(m.perm, I), _coef(m.coef, I)
        parts = {"gate": f64["gate"][p] * c[:, None], "up": f64["up"][p] * c[:, None],
                 "down": f64["down"][:, p] * c[None, :]}
        for n in ("gate_bias", "up_bias"):
            if f64[n] is not None:
                parts[n] = f64[n][p] * c
        if f64["down_bias"] is not None:
            parts["down_bias"] = f64["down_bias"] * c.mean()
        for n, t in parts.items():
            res[n] = t if n not in res else res[n] + t
    if out.neuron_mask is not None:
        keep = out.neuron_mask.bool().cpu().to(torch.float64)
        for n in ("gate", "up"):
            res[n] = res[n] * keep[:, None]
        res["down"] = res["down"] * keep[None, :]
        for n in ("gate_bias", "up_bias"):
            if n in res:
                res[n] = res[n] * keep
    return res


@torch.no_grad()
def write_block(new: MoEBlockView, old: MoEBlockView, lp: LayerPlan,
                expert_rows: ExpertRows = view_expert) -> None:
    """Write the routers and experts of ``lp`` into ``new`` (a view of the compressed model's block)."""
    src = torch.tensor(lp.sources(), dtype=torch.long)
    new.router_weight.copy_(old.router_weight.detach().cpu()[src])
    for name in ("router_bias", "correction_bias"):
        if getattr(new, name) is not None:
            getattr(new, name).copy_(getattr(old, name).detach().cpu()[src])
    for o, out in enumerate(lp.experts):
        for name, t in build_expert(old, out, expert_rows).items():
            getattr(new, name)[o].copy_(t)


def block_storages(blocks: list[MoEBlockView]) -> set[int]:
    """Storage pointers of the blocks' router and expert tensors (what :func:`write_block` writes)."""
    ptrs = set()
    for b in blocks:
        for t in (b.router_weight, b.router_bias, b.correction_bias, b.gate, b.up, b.down,
                  b.gate_bias, b.up_bias, b.down_bias):
            if t is not None:
                ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer (persistent or not) by dotted name; tied ones under each name."""
    out = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for name, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is not None:
                out[f"{prefix}.{name}" if prefix else name] = t
    return out


def meta_like_old(old_model: nn.Module, config: Any) -> nn.Module:
    """A model of the old class built from ``config`` on the meta device (nothing allocated), each
    floating tensor in the dtype of the same-named old tensor (the first parameter's otherwise)."""
    with torch.device("meta"):
        new_model = type(old_model)(config)
    _match_dtypes(old_model, new_model)
    return new_model


def _match_dtypes(old_model: nn.Module, new_model: nn.Module) -> None:
    first = next(old_model.parameters())
    old = _tensors(old_model)
    for prefix, mod in new_model.named_modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                src = old.get(f"{prefix}.{name}" if prefix else name)
                dtype = src.dtype if src is not None else first.dtype
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(dtype)
                    else:
                        store[name] = t.to(dtype)


def _empty_like_old(old_model: nn.Module, config: Any) -> nn.Module:
    """:func:`meta_like_old`, allocated (uninitialised) on the old model's device."""
    new_model = meta_like_old(old_model, config)
    new_model.to_empty(device=next(old_model.parameters()).device)
    new_model.tie_weights()  # to_empty allocates tied parameters separately: tie them again per config
    return new_model


@torch.no_grad()
def _copy_rest(old_model: nn.Module, new_model: nn.Module, written: set[int]) -> None:
    """Copy every same-shaped tensor; fail on a tensor neither copied nor written through the view."""
    old = _tensors(old_model)
    for name, t in _tensors(new_model).items():
        src = old.get(name)
        if src is not None and src.shape == t.shape:
            t.copy_(src)
        elif t.untyped_storage().data_ptr() not in written:
            raise PlanError(f"apply_plan: {name} ({tuple(t.shape)}) changed shape but is not an expert or router "
                            f"tensor of the model view; this family's layout is not handled")


def apply_plan(model: nn.Module | ModelView, plan: Plan) -> nn.Module:
    """A new stock transformers model (same class, same dtype/device) with ``plan`` applied.

    The original model is not modified. ``plan.meta["apply"]`` records the compressed routing
    (experts, top-k, groups) and every change beyond removing experts; each change is also warned.
    """
    view = model if isinstance(model, ModelView) else open_model(model)
    config = plan_config(view, plan)
    old_model = view.model
    new_model = _empty_like_old(old_model, config)
    new_view = open_model(new_model)
    _copy_rest(old_model, new_model, block_storages(new_view.blocks))
    for nb in new_view.blocks:
        ob = view.block(nb.layer)
        write_block(nb, ob, layer_plan(plan, ob))
    new_model.train(old_model.training)
    return new_model


def plan_config(view: ModelView, plan: Plan) -> Any:
    """Check ``plan`` against ``view`` and return the compressed model's config; records the
    compressed routing in ``plan.meta["apply"]`` and warns (CompressWarning) each change."""
    check_plan(view, plan)
    rs = routing_settings(view, plan)
    for note in rs.notes:
        warnings.warn(f"{plan.method}: {note}", CompressWarning, stacklevel=3)
    plan.meta["apply"] = {"num_experts": rs.num_experts, "top_k": rs.top_k, "n_group": rs.n_group,
                          "topk_group": rs.topk_group, "changes": rs.notes}
    return compressed_config(view, rs)


def save_compressed(model: nn.Module, plan: Plan, out_dir: str | Path, *,
                    tokenizer_from: str | Path | Any | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (from :func:`apply_plan`) as a stock safetensors checkpoint with ``plan.json``.

    ``tokenizer_from``: a folder whose tokenizer files are copied, a ``tokenizer.json`` file, or an
    object with ``save_pretrained``. The folder is written under a temporary sibling name and renamed
    when complete, so an interrupted write leaves nothing under ``out_dir``. An existing ``out_dir``
    is refused unless ``overwrite``. The result loads with ``AutoModelForCausalLM.from_pretrained``.
    """
    out = check_out_dir(out_dir, overwrite)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_extras(tmp, plan, tokenizer_from)
    return out


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` as a Path, after refusing an existing one (unless ``overwrite``) or a file."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MoelabError(f"out: {out} already exists; choose another folder or pass overwrite=True "
                          f"(--overwrite)")
    if out.exists() and not out.is_dir():
        raise MoelabError(f"out: {out} is a file; expected a folder to write the checkpoint into")
    return out


def write_extras(tmp: Path, plan: Plan, tokenizer_from: str | Path | Any | None) -> None:
    """The tokenizer files and ``plan.json`` beside a compressed checkpoint's weights."""
    _copy_tokenizer(tokenizer_from, tmp)
    (tmp / "plan.json").write_text(plan.to_json() + "\n", encoding="utf-8")


def _copy_tokenizer(src: str | Path | Any | None, tmp: Path) -> None:
    if src is None:
        return
    if hasattr(src, "save_pretrained"):
        src.save_pretrained(tmp)
        return
    src = Path(src)
    if src.is_file():
        if src.suffix != ".json":
            raise MoelabError(f"tokenizer_from: {src} is not a tokenizer.json file or a folder")
        shutil.copyfile(src, tmp / "tokenizer.json")
        return
    if not src.is_dir():
        raise MoelabError(f"tokenizer_from: {src} does not exist (expected a folder with tokenizer files)")
    names = [n for n in _TOKENIZER_NAMES if (src / n).is_file()]
    if not names:
        raise MoelabError(f"tokenizer_from: {src} has none of the tokenizer files {_TOKENIZER_NAMES}")
    for n in names:
        shutil.copyfile(src / n, tmp / n)

