"""``moelab generate``: stream a continuation of a prompt, optionally with experts switched off or on
(see :mod:`moelab.run.generate` and :mod:`moelab.steer`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

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
@click.option("--stats", is_flag=True, help="Print tokens, tokens/s and the stop reason to stderr at the end.")
def generate_command(model: Path | None, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int | None, off: dict | None, on: dict | None, stats: bool) -> None:
    """Continue PROMPT with MODEL (a checkpoint directory; default: the embedded model), printing
    tokens as they are generated."""
    from moelab.cli.trace import _default
    from moelab.data.tokenizer import load_tokenizer
    from moelab.models import open_model
    from moelab.run.generate import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    model = model or _default("default_model", "MODEL")
    tokenizer = load_tokenizer(model, "the model directory must hold the tokenizer it was trained with")
    view = open_model(model)
    handles = install_switches(view, off, on)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(view.model, tokenizer, prompt, config, handles=handles, on_text=emit)
    emit("\n")
    if result.stop_reason == "context":
        click.echo(f"(stopped at the model's context length after {len(result.token_ids)} new tokens)", err=True)
    if stats:
        click.echo(f"{len(result.prompt_ids)} prompt tokens, {len(result.token_ids)} new tokens, "
                   f"{result.tokens_per_s:.1f} tokens/s, stop: {result.stop_reason}", err=True)


COMMANDS = [generate_command]
