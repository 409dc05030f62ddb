"""The DeepSeekMoE comparison: fine-grained vs coarse MoE vs dense at one token budget.

Dai et al. 2024 (DeepSeekMoE, arXiv:2401.06066, sec. 4) compare, at equal total and active
parameters and equal training tokens, a coarse top-2 MoE (GShard-like), the same experts cut
into finer segments with more of them active per token plus isolated shared experts, and dense
models. moelab's three shipped models (``moelab.default_model("fine" | "coarse" | "dense")``) are
that comparison at a few million parameters; this module re-measures each model's per-domain
validation perplexity on one corpus and puts it beside the figures of its card (parameters,
tokens seen, training time) and its expert load (dead experts, balance).

A row whose token budget differs from the others' is flagged (``same_budget`` False): its numbers
are not comparable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from moelab.errors import MoelabError
from moelab.run.evaluate import EVAL_TOKENS, evaluate_model_dir, load_entropy

DEAD_SHARE = 0.01  # an expert with under 1 % of a layer's assignments (mean over domains) counts as dead


@dataclass
class CompareRow:
    """One model of the comparison. Perplexities are re-measured; the rest comes from its card."""

    name: str
    architecture: str
    params_total: int
    params_active: int
    tokens_seen: int
    steps: int
    train_minutes: float
    perplexity: dict[str, float]
    dead_experts: int | None  # None for a dense model
    experts: int | None
    min_load_entropy: float | None  # lowest normalised load entropy over layers and domains (1 = balanced)
    same_budget: bool = True


def compare_models(model_dirs: dict[str, Path], corpus_dir: Path, tokens: int = EVAL_TOKENS) -> list[CompareRow]:
    """Rows of the comparison, one per exported model folder (``name -> folder`` with a ``card.json``)."""
    rows = []
    for name, path in model_dirs.items():
        card_path = Path(path) / "card.json"
        if not card_path.is_file():
            raise MoelabError(f"compare: {path} has no card.json (expected a folder written by `moelab export`)")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        res = evaluate_model_dir(path, corpus_dir, tokens)
        load = next(iter(res.load_LE.values()), [])
        dead = experts = entropy = None
        if load:
            domains = list(res.load_LE)
            mean_LE = [[sum(res.load_LE[d][i][e] for d in domains) / len(domains) for e in range(len(load[i]))]
                       for i in range(len(load))]
            dead = sum(p < DEAD_SHARE for row in mean_LE for p in row)
            experts = sum(len(row) for row in mean_LE)
            entropy = round(min(min(load_entropy(v)) for v in res.load_LE.values()), 4)
        rows.append(CompareRow(
            name=name, architecture=card["architecture"], params_total=card["params"]["total"],
            params_active=card["params"]["active_per_token"], tokens_seen=card["tokens_seen"], steps=card["step"],
            train_minutes=round(card["train_seconds"] / 60, 1),
            perplexity={d: round(v, 3) for d, v in res.perplexity.items()},
            dead_experts=dead, experts=experts, min_load_entropy=entropy))
    budgets = [r.tokens_seen for r in rows]
    common = max(set(budgets), key=budgets.count) if budgets else 0
    for r in rows:
        r.same_budget = r.tokens_seen == common
    return rows


def markdown_table(rows: list[CompareRow]) -> str:
    """The comparison as a Markdown table (perplexity per domain, lower is better)."""
    domains = list(rows[0].perplexity) if rows else []
    head = ["model", "class", "params (M)", "active (M)", "tokens (M)", *[f"ppl {d}" for d in domains],
            "dead experts", "min load entropy"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        dead = "-" if r.dead_experts is None else f"{r.dead_experts} of {r.experts}"
        ent = "-" if r.min_load_entropy is None else f"{r.min_load_entropy:.3f}"
        budget = "" if r.same_budget else " (other budget)"
        cells = [r.name, f"`{r.architecture}`", f"{r.params_total / 1e6:.2f}", f"{r.params_active / 1e6:.2f}",
                 f"{r.tokens_seen / 1e6:.2f}{budget}", *[f"{r.perplexity[d]:.2f}" for d in domains], dead, ent]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rows_to_json(rows: list[CompareRow]) -> list[dict]:
    return [asdict(r) for r in rows]
