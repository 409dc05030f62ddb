"""Render the default model's card (``README.md``) from the numbers :mod:`moelab.train.export` measured.

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
    for layer in range(len(load[domains[0]])):
        lines += [f"**Layer {layer}** (share of top-{card['train_config']['top_k']} assignments, %)", "",
                  "| domain | " + " | ".join(f"e{e}" for e in range(n_exp)) + " |",
                  "| --- | " + " | ".join("---:" for _ in range(n_exp)) + " |"]
        for d in domains:
            lines.append(f"| {d} | " + " | ".join(f"{100 * p:.1f}" for p in load[d][layer]) + " |")
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
    for layer, row in enumerate(shift):
        lines.append(f"| {layer} | {100 * min(mean_share[layer]):.1f} % | {100 * max(mean_share[layer]):.1f} % | "
                     + " | ".join(f"{row[d]:.2f}" for d in domains) + " |")
    dead = sum(1 for layer in mean_share for p in layer if p < 0.01)
    lines += ["", f"Uniform share is {100 / n_exp:.1f} %. Experts with under 1 % of assignments (dead): {dead} of "
              f"{n_exp * len(mean_share)}. *Shift* is the total-variation distance of a domain's load from the "
              "mean over domains: 0 means all domains use the experts alike."]
    return lines


def render_card(card: dict[str, Any]) -> str:
    """The model card as Markdown."""
    tc, p, m = card["train_config"], card["params"], card["machine"]
    lines = [
        "---", "library_name: transformers", "license: apache-2.0", "pipeline_tag: text-generation", "---", "",
        "# moelab default MoE model", "",
        "A small Mixture-of-Experts causal language model that moelab trains itself, on CPU, on its embedded",
        "three-domain corpus (Python code, Shakespeare, Python documentation prose). It exists so that every",
        "moelab command has a real MoE model to work on without a model hub. Load it with",
        "`AutoModelForCausalLM.from_pretrained(moelab.default_model())`.", "",
        "## Architecture", "",
        f"`{card['architecture']}` (`model_type: {card['model_type']}`), stock transformers code:",
        f"{tc['num_layers']} layers, hidden size {tc['hidden_size']}, {tc['num_heads']} attention heads "
        f"({tc['num_kv_heads']} key/value heads), {tc['num_experts']} SwiGLU experts of width {tc['expert_ffn']} "
        f"in every layer, top-{tc['top_k']} routing, tied embeddings, vocabulary {card['vocab_size']}, "
        f"context {tc['seq_len']} tokens.",
        f"Parameters: {p['total'] / 1e6:.2f} M in all ({p['experts'] / 1e6:.2f} M in experts), "
        f"{p['active_per_token'] / 1e6:.2f} M active per token.", "",
        "Why Qwen3-MoE: " + WHY_QWEN3_MOE, "",
        "## Data", "",
        "moelab's default corpus (`moelab.default_corpus()`, licences in its `LICENSES` file), split by document:", "",
        "| domain | source | train docs | train chars | val docs | val chars |", "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    sources = {"code": "CPython standard library `.py` (PSF)", "drama": "Shakespeare, Project Gutenberg (public domain)",
               "prose": "CPython `pydoc_data/topics.py` (PSF)"}
    for d, s in card["corpus"].items():
        lines.append(f"| {d} | {sources.get(d, d)} | {s['train']['documents']} | {s['train']['chars']:,} | "
                     f"{s['val']['documents']} | {s['val']['chars']:,} |")
    weights = ", ".join(f"{d} {w:g}" for d, w in tc["domain_weights"].items())
    lines += [
        "", f"Tokenizer: byte-level BPE ({card['vocab_size']} tokens) trained on the training split. "
        f"Corpus manifest sha256 `{card['corpus_manifest_sha256'][:16]}…`.", "",
        "## Training", "",
        f"{card['step']:,} steps of {tc['batch_size']} × {tc['seq_len']} tokens: **{card['tokens_seen']:,} tokens seen**, "
        f"rows drawn from the domains with weights {weights}. AdamW (β 0.9/0.95, weight decay {tc['weight_decay']} on "
        f"matrices), peak learning rate {tc['lr']:g} after {tc['warmup_steps']} warmup steps, cosine decay to "
        f"{tc['min_lr_ratio']:g} × peak, gradient clipping {tc['grad_clip']:g}; load-balancing loss (Switch "
        f"Transformer) × {tc['aux_coef']:g} and router z-loss (ST-MoE) × {tc['z_coef']:g}, seed {tc['seed']}.",
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
    lines += ["", "## Expert load by domain", "", *_summary(card), "", *_load_tables(card),
              "## Reproduce", "", "```bash", card["command"], "moelab perplexity   # re-measures the table above", "```", "",
              f"All numbers in this card were written by `moelab export` on {card['exported_utc']} UTC "
              "(also in `card.json`)."]
    return "\n".join(lines) + "\n"
