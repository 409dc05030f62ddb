"""DeepSeek-style routers: DeepSeek-V2, DeepSeek-V3 and GLM4-MoE.

All three keep a router ``gate.weight [E, H]`` (float32), standard fused experts and always-on
``shared_experts`` (one GLU MLP of width ``moe_intermediate_size * n_shared_experts``), and scale
the top-k weights by ``routed_scaling_factor``. They differ in scoring and group selection:

* DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434): softmax scores; ``topk_method``
  ``greedy`` (plain top-k) or ``group_limited_greedy`` (a group's score is its best expert's,
  keep the ``topk_group`` best groups); no renormalisation.
* DeepSeek-V3 (arXiv:2412.19437) and GLM4-MoE: sigmoid scores; selection on
  ``score + e_score_correction_bias`` (the aux-loss-free balancing bias, selection only); a
  group's score is the sum of its two best corrected scores; weights renormalised when
  ``norm_topk_prob``.

Layers below ``first_k_dense_replace`` are dense MLPs and show up in ``ModelView.dense_layers``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moelab.models.families._common import (
    act_name,
    check_experts,
    config_num_experts,
    d,
    experts_prehook_installer,
    fused_gate_up,
    glu_mlp,
    linear_logits,
)
from moelab.models.families._config import write_counts
from moelab.models.families._experts import STANDARD
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView

# the router: logits = F.linear(hidden.float(), weight.float()); weights in float32
_HOOKS = experts_prehook_installer(logits_index=0, router_logits=linear_logits(float32=True), weights_float32=True)


def write_config(config: Any, num_experts: int, top_k: int, n_group: int | None) -> Any:
    """:func:`write_counts`; ``n_group`` None switches group-limited routing off (``n_group =
    topk_group = 1``), otherwise the groups stay as they are."""
    new = write_counts(config, num_experts, top_k)
    if getattr(new, "n_group", None) is not None and n_group is None:
        new.n_group, new.topk_group = 1, 1
    return new


def _read(family: str, model: nn.Module, module: nn.Module, path: str, layer: int) -> MoEBlockView:
    config = model.config
    router, experts = module.gate, module.experts
    act = act_name(config.hidden_act, f"{path} config.hidden_act")
    gate, up, down = fused_gate_up(experts.gate_up_proj, experts.down_proj, path)
    if family == "DeepSeek-V2":
        grouped = getattr(router, "topk_method", "greedy") == "group_limited_greedy"
        routing = dict(scoring="softmax", norm_topk_prob=False, group_score="max")
    else:
        grouped = True
        routing = dict(
            scoring="sigmoid",
            norm_topk_prob=bool(router.norm_topk_prob),
            group_score="top2_sum",
            correction_bias=d(router.e_score_correction_bias),
            # HF adds 1e-20 to the denominator; a floor at 1e-20 is the same to float64 precision
            norm_min=1e-20,
        )
    n_group = int(router.num_group) if grouped and router.num_group else None
    view = MoEBlockView(
        family=family,
        path=path,
        layer=layer,
        module=module,
        router_module=router,
        experts_module=experts,
        top_k=int(router.top_k),
        router_weight=d(router.weight),
        n_group=n_group if n_group and n_group > 1 else None,
        topk_group=int(router.topk_group) if n_group and n_group > 1 else None,
        routed_scaling_factor=float(router.routed_scaling_factor),
        gate=gate,
        up=up,
        down=down,
        act=act,
        layout="fused_gate_up",
        shared=glu_mlp(module.shared_experts, f"{path}.shared_experts", act),
        hook_installer=_HOOKS,
        **routing,
    )
    return check_experts(view, config_num_experts(config), config.moe_intermediate_size)


def _reader(family: str):
    def read(model: nn.Module, module: nn.Module, path: str, layer: int) -> MoEBlockView:
        return _read(family, model, module, path, layer)

    return read


ADAPTERS = (
    FamilyAdapter(
        "DeepSeek-V2",
        ("deepseek_v2",),
        ("DeepseekV2Moe",),
        _reader("DeepSeek-V2"),
        "DeepseekV2Config",
        write_config=write_config,
        experts_backend=STANDARD,
    ),
    FamilyAdapter(
        "DeepSeek-V3",
        ("deepseek_v3",),
        ("DeepseekV3MoE",),
        _reader("DeepSeek-V3"),
        "DeepseekV3Config",
        write_config=write_config,
        experts_backend=STANDARD,
    ),
    FamilyAdapter(
        "GLM4-MoE",
        ("glm4_moe",),
        ("Glm4MoeMoE",),
        _reader("GLM4-MoE"),
        "Glm4MoeConfig",
        write_config=write_config,
        experts_backend=STANDARD,
    ),
)
