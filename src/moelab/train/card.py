"""Render a shipped model's card (``README.md``) from the numbers :mod:`moelab.train.export` measured.

Nothing here computes a model number: every figure comes from the ``card`` dict (also saved as
``card.json``). The specialisation summary is arithmetic on the load table: for each layer, the total
variation distance ``0.5 * sum_e |p_domain(e) - p_mean(e)|`` between a domain's expert-load share
and the mean share over domains (0 = every domain routes alike; with D domains on disjoint experts it
is 1 - 1/D).
"""

from __future__ import annotations

from typing import Any

WHY_QWEN3_MOE = (
    "Qwen3-MoE is the stock transformers family closest to current MoE practice (Qwen3-30B-A3B): every "
    "layer sparse, softmax top-k routing renormalised over the chosen experts, SwiGLU experts stored "
    "as fused 3-D tensors, and per-head q/k RMS-norm, which keeps attention stable at the high learning "
    "rate a few-million-parameter model needs. OLMoE would also do; it differs mainly in its q/k-norm "
    "over the whole projection and in not renormalising top-k weights, and Qwen3-MoE's `grouped_mm` "
    "experts path measured fastest on this CPU. Its router returns raw logits, so the load-balancing "
    "and z-losses are computed from them by moelab and nothing is hidden in the model."
)


WHY_DEEPSEEK_V3 = (
    "DeepSeek-V3 is the stock transformers family that has both of DeepSeekMoE's ideas (Dai et al. 2024, "
    "arXiv:2401.06066) — fine-grained expert segmentation and an isolated, always-on shared expert — plus "
    "a dense first layer and sigmoid routing with the auxiliary-loss-free correction bias (arXiv:2412.19437). "
    "transformers keeps `e_score_correction_bias` as a buffer but never updates it; moelab updates it after "
    "every optimizer step by the DeepSeek-V3 rule `b_e += rate * sign(mean load - load_e)`, counted on the "
    "experts the step's tokens were sent to. Its `grouped_mm` experts path trains as fast per token on this "
    "CPU as the coarse Qwen3-MoE model of the same active width. The architecture requires multi-head latent "
    "attention, so attention differs from the coarse and dense models (Qwen3 attention)."
)
WHY_QWEN3 = (
    "The dense twin of the MoE models: stock Qwen3 (the coarse Qwen3-MoE model's attention and hidden size) "
    "whose one FFN per layer is as wide as an MoE layer's routed experts together, the start point for "
    "dense-to-MoE conversion and the baseline that compares the MoE models to a dense model at one token budget."
)
_WHY = {"qwen3_moe": WHY_QWEN3_MOE, "deepseek_v3": WHY_DEEPSEEK_V3, "qwen3": WHY_QWEN3}
_TITLE = {"qwen3_moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3", "qwen3": "Qwen3"}


def load_shift(load: dict[str, list[list[float]]]) -> list[dict[str, float]]:
    """Per layer, each domain's total-variation distance from the domains' mean expert-load share."""
    domains = list(load)
    out = []
    for layer in range(len(load[domains[0]])):
        mean = [sum(load[d][layer][e] for d in domains) / len(domains) for e in range(len(load[domains[0]][layer]))]
        out.append({d: 0.5 * sum(abs(p - m) for p, m in zip(load[d][layer], mean, strict=True)) for d in domains})
    return out


def _load_tables(card: dict[str, Any]) -> list[str]:
    load = card["load_by_domain"]
    domains = list(load)
    n_exp = len(load[domains[0]][0])
    lines = []
    for row, layer in enumerate(_moe_layers(card)):
        lines += [f"**Layer {layer}** (share of top-{card['train_config']['top_k']} assignments, %)", "",
                  "| domain | " + " | ".join(f"e{e}" for e in range(n_exp)) + " |",
                  "| --- | " + " | ".join("---:" for _ in range(n_exp)) + " |"]
        for d in domains:
            lines.append(f"| {d} | " + " | ".join(f"{100 * p:.1f}" for p in load[d][row]) + " |")
        lines.append("")
    return lines


def _summary(card: dict[str, Any]) -> list[str]:
    load = card["load_by_domain"]
    domains = list(load)
    shift = load_shift(load)
    mean_share = [[sum(load[d][layer][e] for d in domains) / len(domains) for e in range(len(load[domains[0]][layer]))]
                  for layer in range(len(shift))]
    n_exp = len(mean_share[0])
    lines = ["| layer | min expert share (mean over domains) | max expert share | "
             + " | ".join(f"shift {d}" for d in domains) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in domains) + " |"]
    for i, (layer, row) in enumerate(zip(_moe_layers(card), shift, strict=True)):
        lines.append(f"| {layer} | {100 * min(mean_share[i]):.1f} % | {100 * max(mean_share[i]):.1f} % | "
                     + " | ".join(f"{row[d]:.2f}" for d in domains) + " |")
    dead = sum(1 for layer in mean_share for p in layer if p < 0.01)
    lines += ["", f"Uniform share is {100 / n_exp:.1f} %. Experts with under 1 % of assignments (dead): {dead} of "
              f"{n_exp * len(mean_share)}. *Shift* is the total-variation distance of a domain's load from the "
              "mean over domains: 0 means all domains use the experts alike."]
    return lines


def _moe_layers(card: dict[str, Any]) -> list[int]:
    tc = card["train_config"]
    return list(range(tc.get("dense_layers", 0), tc["num_layers"]))


def _architecture(card: dict[str, Any]) -> str:
    tc, arch = card["train_config"], card["train_config"].get("arch", "qwen3_moe")
    common = (f"{tc['num_layers']} layers, hidden size {tc['hidden_size']}, {tc['num_heads']} attention heads "
              f"({tc['num_kv_heads']} key/value heads)")
    tail = f"tied embeddings, vocabulary {card['vocab_size']}, context {tc['seq_len']} tokens."
    if arch == "qwen3":
        return f"{common}, one SwiGLU FFN of width {tc['dense_ffn']} per layer, {tail}"
    if arch == "deepseek_v3":
        dense = tc["dense_layers"]
        width = tc["dense_ffn"] or tc["expert_ffn"] * (tc["top_k"] + tc["shared_experts"])
        return (f"{common} in multi-head latent attention (KV rank {tc['hidden_size'] // 2}); the first {dense} "
                f"layer(s) dense (SwiGLU width {width}), then {tc['num_experts']} routed SwiGLU experts of width "
                f"{tc['expert_ffn']} with top-{tc['top_k']} sigmoid routing (renormalised, correction bias updated "
                f"at rate {tc['bias_rate']:g} per step) and {tc['shared_experts']} shared expert(s) of the same "
                f"width per layer, {tail}")
    return (f"{common}, {tc['num_experts']} SwiGLU experts of width {tc['expert_ffn']} in every layer, "
            f"top-{tc['top_k']} routing, {tail}")


def _router_losses(tc: dict[str, Any]) -> str:
    arch = tc.get("arch", "qwen3_moe")
    if arch == "qwen3":
        return "no router losses (dense)"
    if arch == "deepseek_v3":
        return (f"DeepSeek-V3's sequence-wise balance loss × {tc['aux_coef']:g} and the auxiliary-loss-free bias "
                f"update at rate {tc['bias_rate']:g}")
    return f"load-balancing loss (Switch Transformer) × {tc['aux_coef']:g} and router z-loss (ST-MoE) × {tc['z_coef']:g}"


_PROSE = {"topics": "CPython `pydoc_data/topics.py` (PSF)",
          "docs": "Python 3.11 documentation, reST sources from Debian `python3.11-doc` (PSF)"}


def render_card(card: dict[str, Any]) -> str:
    """The model card as Markdown."""
    tc, p, m = card["train_config"], card["params"], card["machine"]
    arch = tc.get("arch", "qwen3_moe")
    name = card.get("name", "default")
    lines = [
        "---", "library_name: transformers", "license: apache-2.0", "pipeline_tag: text-generation", "---", "",
        f"# moelab {name} model", "",
        "A small causal language model that moelab trains itself, on CPU, on its embedded three-domain corpus",
        "(Python code, Shakespeare, Python documentation prose). It exists so that every moelab command has a",
        "real model to work on without a model hub. Load it with",
        f"`AutoModelForCausalLM.from_pretrained(moelab.default_model({name!r}))`.", "",
        "## Architecture", "",
        f"`{card['architecture']}` (`model_type: {card['model_type']}`), stock transformers code:",
        _architecture(card),
        f"Parameters: {p['total'] / 1e6:.2f} M in all ({p['experts'] / 1e6:.2f} M in routed experts), "
        f"{p['active_per_token'] / 1e6:.2f} M active per token.", "",
        *(["Routed experts are ternary ({-1, 0, +1} times one scale per expert matrix, MoTE, arXiv:2506.14435), "
           "trained through a straight-through estimator (`moelab.nn.ternary`); the shared expert, routers and "
           "attention are full precision." + (f" Fine-tuned from `{tc['init_from']}`." if tc.get("init_from") else ""), ""]
          if tc.get("ternary_experts") else []),
        f"Why {_TITLE[arch]}: " + _WHY[arch], "",
        "## Data", "",
        "moelab's default corpus (`moelab.default_corpus()`, licences in its `LICENSES` file), split by document:", "",
        "| domain | source | train docs | train chars | val docs | val chars |", "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    sources = {"code": "CPython standard library `.py` (PSF)", "drama": "Shakespeare, Project Gutenberg (public domain)",
               "prose": _PROSE["docs" if "python3.11-doc" in card.get("corpus_sources", {}).get("prose", "") else "topics"]}
    for d, s in card["corpus"].items():
        lines.append(f"| {d} | {sources.get(d, d)} | {s['train']['documents']} | {s['train']['chars']:,} | "
                     f"{s['val']['documents']} | {s['val']['chars']:,} |")
    weights = ", ".join(f"{d} {w:g}" for d, w in tc["domain_weights"].items())
    lines += [
        "", f"Tokenizer: byte-level BPE ({card['vocab_size']} tokens) trained on the training split"
        + (" of code, drama and the earlier prose source `pydoc_data/topics.py`, shared by every shipped model. "
           if "tokenizer_prose" in card.get("corpus_sources", {}) else ". ") +
        f"Corpus manifest sha256 `{card['corpus_manifest_sha256'][:16]}…`.", "",
        "## Training", "",
        f"{card['step']:,} steps of {tc['batch_size']} × {tc['seq_len']} tokens: **{card['tokens_seen']:,} tokens seen**, "
        f"rows drawn from the domains with weights {weights}. AdamW (β 0.9/0.95, weight decay {tc['weight_decay']} on "
        f"matrices), peak learning rate {tc['lr']:g} after {tc['warmup_steps']} warmup steps, cosine decay to "
        f"{tc['min_lr_ratio']:g} × peak, gradient clipping {tc['grad_clip']:g}; {_router_losses(tc)}, seed {tc['seed']}.",
        f"Training time {card['train_seconds'] / 60:.1f} min of compute on {m['torch_threads']} torch thread(s) of a "
        f"{m['cpu_count']}-core CPU machine shared with other jobs ({m['platform']}; torch {m['torch']}, "
        f"transformers {m['transformers']}), finished {card['trained_until_utc']} UTC.", "",
        "![training loss](loss.png)", "",
        "## Validation perplexity", "",
        "On a fixed slice of each domain's validation split (its first tokens, windows of 256):", "",
        "| domain | tokens | loss (nats/token) | perplexity |", "| --- | ---: | ---: | ---: |",
    ]
    for d, v in card["perplexity"].items():
        lines.append(f"| {d} | {card['eval_tokens'][d]:,} | {card['val_loss'][d]:.4f} | {v:.2f} |")
    load_part = ["## Expert load by domain", "", *_summary(card), "", *_load_tables(card)] if arch != "qwen3" else []
    lines += ["", *load_part,
              "## Reproduce", "", "```bash", card["command"], "moelab perplexity   # re-measures the table above", "```", "",
              f"All numbers in this card were written by `moelab export` on {card['exported_utc']} UTC "
              "(also in `card.json`)."]
    return "\n".join(lines) + "\n"
