"""``moelab generate``: stream a continuation of a prompt, optionally with experts switched off or on
(see :mod:`moelab.run.generate` and :mod:`moelab.steer`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from moelab.cli._options import check_predictor_option, predictor_option
from moelab.cli.steer import steer_option
from moelab.errors import MoelabError


class LayerExperts(click.ParamType):
    """``L:E,L:E,...`` -> ``{layer: [expert, ...]}`` (ids checked against the model later)."""

    name = "L:E,..."

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        out: dict[int, list[int]] = {}
        for item in (s.strip() for s in str(value).split(",")):
            layer, sep, expert = item.partition(":")
            try:
                if not sep:
                    raise ValueError
                out.setdefault(int(layer), []).append(int(expert))
            except ValueError:
                self.fail(f"{item!r} is not LAYER:EXPERT (integers), e.g. 1:3,2:0", param, ctx)
        return out


def install_switches(view, off: dict[int, list[int]] | None, on: dict[int, list[int]] | None) -> list:
    """The handles of ``experts_off`` / ``experts_on`` for ``--off`` / ``--on``; a bad layer or
    expert is an error naming the option."""
    from moelab.steer import experts_off, experts_on

    handles = []
    try:
        for option, spec, edit in (("--off", off, experts_off), ("--on", on, experts_on)):
            if spec:
                try:
                    handles.append(edit(view, spec))
                except MoelabError as err:
                    raise MoelabError(f"{option}: {err}") from None
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


@click.command("generate")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="At most this many new tokens (fewer at end-of-text or at the model's context length).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy; above 0 samples from softmax(logits / temperature).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: sample from the smallest set of tokens with this much probability.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (default: not seeded).")
@click.option("--off", type=LayerExperts(), default=None,
              help="Switch experts off: LAYER:EXPERT,... (routing as if their logits were -inf).")
@click.option("--on", type=LayerExperts(), default=None,
              help="Force experts into every token's top-k: LAYER:EXPERT,...")
@steer_option
@click.option("--decode", type=click.Choice(["plain", "scmoe", "rewire"]), default="plain", show_default=True,
              help="scmoe: self-contrast of the top-k and a rank-r top-1 pass (SCMoE); rewire: router-logit "
                   "offsets fitted on the context (Rewiring experts on the fly).")
@click.option("--alpha", type=float, default=0.1, show_default=True, help="SCMoE plausibility cut-off, in (0, 1].")
@click.option("--beta", type=float, default=0.5, show_default=True, help="SCMoE contrast strength, >= 0.")
@click.option("--rank", type=int, default=None, help="SCMoE weak pass's expert rank from 0 (default: top_k).")
@click.option("--rewire-every", type=click.IntRange(min=1), default=16, show_default=True,
              help="Rewiring: refit the offsets every this many new tokens.")
@click.option("--expert-budget", default=None,
              help="Offload the experts: keep at most this many expert bytes resident (e.g. 64MiB, 25%%).")
@click.option("--policy", default="lru", show_default=True, help="Expert cache policy with --expert-budget.")
@predictor_option
@click.option("--stats", is_flag=True, help="Print tokens, tokens/s and the stop reason to stderr at the end.")
def generate_command(model: Path | None, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int | None, off: dict | None, on: dict | None, steer: Path | None, decode: str,
                     alpha: float, beta: float, rank: int | None, rewire_every: int, expert_budget: str | None,
                     policy: str, predictor: Path | None, stats: bool) -> None:
    """Continue PROMPT with MODEL (a checkpoint directory; default: the embedded model), printing
    tokens as they are generated."""
    from moelab.cli._options import embedded_default
    from moelab.data.tokenizer import load_tokenizer
    from moelab.models import open_model
    from moelab.run.generate import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    model = model or embedded_default("default_model", "MODEL")
    tokenizer = load_tokenizer(model, "the model directory must hold the tokenizer it was trained with")
    offloaded = None
    if expert_budget is not None:
        from moelab.offload import offload_model

        check_predictor_option(predictor, policy, required=True)
        _, offloaded = offload_model(model, budget=expert_budget, policy=policy, predictor=predictor)
        view = offloaded.view
    else:
        if predictor is not None or policy != "lru":
            raise MoelabError("--policy and --predictor choose the expert cache of --expert-budget; give "
                              "--expert-budget SIZE too")
        view = open_model(model)
    handles = install_switches(view, off, on)
    if steer is not None:
        from moelab.steer import apply_steering, load_steering

        handles.append(apply_steering(view, load_steering(steer, view)))
    scorer = _scorer(view, decode, alpha, beta, rank, rewire_every)
    if hasattr(scorer, "remove"):
        handles.append(scorer)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        result = generate(view.model, tokenizer, prompt, config, handles=handles, on_text=emit, scorer=scorer)
    finally:
        if offloaded is not None:
            offloaded.close()
    emit("\n")
    if result.stop_reason == "context":
        click.echo(f"(stopped at the model's context length after {len(result.token_ids)} new tokens)", err=True)
    if stats:
        click.echo(f"{len(result.prompt_ids)} prompt tokens, {len(result.token_ids)} new tokens, "
                   f"{result.tokens_per_s:.1f} tokens/s, stop: {result.stop_reason}", err=True)
        if offloaded is not None:
            st = offloaded.stats()
            click.echo(f"experts: hit rate {st.hit_rate:.3f} ({st.hits} hits, {st.misses} misses), "
                       f"{st.bytes_read / 2**20:.1f} MiB read, peak resident {st.peak_resident_bytes / 2**20:.1f} MiB "
                       f"of {st.budget_bytes / 2**20:.1f} MiB", err=True)


def _scorer(view, decode: str, alpha: float, beta: float, rank: int | None, every: int):
    """The next-token scorer of ``--decode`` (None: the model's own logits); bad settings name the option."""
    if decode == "plain":
        return None
    try:
        if decode == "scmoe":
            from moelab.steer.scmoe import SCMoEConfig, SCMoEDecoder

            return SCMoEDecoder(view, SCMoEConfig(alpha=alpha, beta=beta, rank=rank))
        from moelab.steer.rewire import RewireConfig, RewireScorer

        return RewireScorer(view, RewireConfig(every=every))
    except MoelabError as err:
        raise MoelabError(f"--decode {decode}: {err}") from None


COMMANDS = [generate_command]
