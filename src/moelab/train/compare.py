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

Forward FLOPs per token follow Kaplan et al. 2020's convention (arXiv:2001.08361, table 1): two per
multiply-accumulate of every weight a token passes through (the active parameters less the input
embedding, which is a lookup; with tied embeddings that matrix is also the output projection, so it
is counted back), plus attention over a full context of ``n_ctx`` training tokens,
``2·L·n_ctx·H·(d_qk + d_v)`` (scores and the weighted sum of values):

    FLOPs/token = 2·(N_active − N_embed + [tied]·N_embed) + 2·L·n_ctx·H·(d_qk + d_v)
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
    flops_per_token: int = 0
    curve: dict | None = None  # the card's training curve (tokens, train_ce, val)
    same_budget: bool = True


def flops_per_token(model_dir: Path, active_params: int, n_ctx: int) -> int:
    """Forward FLOPs per token of the model in ``model_dir`` (formula in the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    embed = model.get_input_embeddings().weight.numel()
    head = embed if cfg.tie_word_embeddings else 0  # untied: the output projection is in active_params
    heads = cfg.num_attention_heads
    d_qk = getattr(cfg, "qk_head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    d_v = getattr(cfg, "v_head_dim", None) or d_qk
    attention = 2 * cfg.num_hidden_layers * n_ctx * heads * (d_qk + d_v)
    return 2 * (active_params - embed + head) + attention


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
            dead_experts=dead, experts=experts, min_load_entropy=entropy,
            flops_per_token=flops_per_token(Path(path), card["params"]["active_per_token"],
                                            card["train_config"]["seq_len"]),
            curve=card.get("curve")))
    budgets = [r.tokens_seen for r in rows]
    common = max(set(budgets), key=budgets.count) if budgets else 0
    for r in rows:
        r.same_budget = r.tokens_seen == common
    return rows


def markdown_table(rows: list[CompareRow]) -> str:
    """The comparison as a Markdown table (perplexity per domain, lower is better)."""
    domains = list(rows[0].perplexity) if rows else []
    head = ["model", "class", "params (M)", "active (M)", "MFLOPs/token", "tokens (M)", "train min",
            *[f"ppl {d}" for d in domains], "dead experts", "min load entropy"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in rows:
        dead = "-" if r.dead_experts is None else f"{r.dead_experts} of {r.experts}"
        ent = "-" if r.min_load_entropy is None else f"{r.min_load_entropy:.3f}"
        budget = "" if r.same_budget else " (other budget)"
        cells = [r.name, f"`{r.architecture}`", f"{r.params_total / 1e6:.2f}", f"{r.params_active / 1e6:.2f}",
                 f"{r.flops_per_token / 1e6:.2f}", f"{r.tokens_seen / 1e6:.2f}{budget}", f"{r.train_minutes:.1f}", *[f"{r.perplexity[d]:.2f}" for d in domains], dead, ent]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rows_to_json(rows: list[CompareRow]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "curve"} for r in rows]


def plot_curves(rows: list[CompareRow], path: Path) -> Path | None:
    """Training cross-entropy of every model against tokens seen on one plot, with validation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moelab.data.atomic import atomic_write

    drawn = [r for r in rows if r.curve and r.curve["tokens"]]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in drawn:
        line, = ax.plot([t / 1e6 for t in r.curve["tokens"]], r.curve["train_ce"], lw=1.2,
                        label=f"{r.name} ({r.params_active / 1e6:.2f} M active)")
        val = [pt for pts in r.curve["val"].values() for pt in pts]
        if val:  # the mean validation loss over domains at each evaluation
            by_tokens: dict[int, list[float]] = {}
            for t, loss in val:
                by_tokens.setdefault(t, []).append(loss)
            xs = sorted(by_tokens)
            ax.plot([t / 1e6 for t in xs], [sum(by_tokens[t]) / len(by_tokens[t]) for t in xs], "o--",
                    ms=3, lw=0.8, color=line.get_color())
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training curves (solid: train, dashed: mean validation over domains)")
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
