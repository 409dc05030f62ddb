"""The write side every family adapter shares: a copy of a config with another expert count and top-k.

Used as ``FamilyAdapter.write_config`` by the families that keep both numbers in top-level config
fields; a family that stores them otherwise (DBRX's ``ffn_config``) or has group-limited routing
(DeepSeek, GLM4) writes its own in its adapter module, on top of :func:`write_counts`.
"""

from __future__ import annotations

import copy
from typing import Any

from moelab.errors import MoelabError

# config fields holding the routed-expert count / top-k, whatever the family calls them
COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOPK_FIELDS = ("num_experts_per_tok", "moe_k", "moe_topk")


def write_counts(config: Any, num_experts: int, top_k: int, n_group: int | None = None) -> Any:
    """A copy of ``config`` whose every expert-count and top-k field holds ``num_experts`` / ``top_k``.

    A field holding one value per layer (HunYuan) keeps its list form. ``n_group`` is accepted for
    the common signature; these families have no groups.
    """
    new = copy.deepcopy(config)
    keys = set(new.to_dict())
    count_keys = [k for k in COUNT_FIELDS if k in keys]
    topk_keys = [k for k in TOPK_FIELDS if k in keys]
    if not count_keys or not topk_keys:
        raise MoelabError(f"{type(config).__name__}: no expert-count / top-k field found among "
                          f"{COUNT_FIELDS} / {TOPK_FIELDS}")
    for k in count_keys:
        setattr(new, k, _like(getattr(new, k), num_experts))
    for k in topk_keys:
        setattr(new, k, _like(getattr(new, k), top_k))
    return new


def _like(old: Any, value: int) -> Any:
    return [value] * len(old) if isinstance(old, list) else value


def config_names_experts(config: Any) -> bool:
    """Whether a config (of any family, supported or not) gives a routed-expert count: the fields of
    :data:`COUNT_FIELDS`, or DBRX's nested ``ffn_config``. False suggests a dense model."""
    return any(getattr(config, f, None) for f in (*COUNT_FIELDS, "ffn_config"))
