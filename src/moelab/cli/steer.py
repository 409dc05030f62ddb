"""``moelab steer detect``: find the experts behind a behaviour and write a steering file;
``moelab steer dyncount``: a steering file routing tokens to fewer experts (see :mod:`moelab.steer`);
``eval``, ``trace`` (and ``generate``) apply one with ``--steer``."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.cli._options import CORPUS_FORMATS, no_progress_option
from moelab.errors import MoelabError

SOURCE_HELP = (f"A corpus ({CORPUS_FORMATS} A `moelab data build` corpus gives its train split), "
               "CORPUS:LABEL for one label of it, a domain of the embedded corpus (code, drama, prose), "
               "or a `moelab trace` directory.")


def steer_option(f):
    """``--steer FILE``: one spelling and help text on every command that applies a steering file."""
    return click.option("--steer", "steer", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Steering file (from `moelab steer detect`) to apply to the model.")(f)


def parse_source(value: str, option: str) -> tuple[Path, str | None]:
    """``(path, label)`` of a ``--positive``/``--negative`` value (see ``SOURCE_HELP``)."""
    path = Path(value)
    if path.exists():
        return path, None
    head, sep, label = value.rpartition(":")
    if sep and head and Path(head).exists():
        return Path(head), label
    from moelab.data import default_corpus
    from moelab.data.sources import DOMAINS

    if value in DOMAINS:
        return default_corpus(), value
    raise MoelabError(f"{option} {value!r}: not an existing corpus or trace, CORPUS:LABEL, or a domain of the "
                      f"embedded corpus ({', '.join(DOMAINS)})")


def _print_ranking(det, selected: dict[int, list[int]], show: int, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    score = {"rice": "nPMI", "log-odds": "log odds"}.get(det.method, "risk diff")
    table = Table(title=title)
    for col in ("rank", "layer", "expert", "rate +", "rate -", score, "z", "95% CI", "chosen"):
        table.add_column(col, justify="right")
    for i, r in enumerate(det.rows[:show], 1):
        chosen = "yes" if r.expert in selected.get(r.layer, []) else ""
        table.add_row(str(i), str(r.layer), str(r.expert), f"{r.rate_pos:.3f}", f"{r.rate_neg:.3f}",
                      f"{r.score:+.3f}", f"{r.z:+.1f}", f"{r.ci_low:+.2f}..{r.ci_high:+.2f}", chosen)
    Console().print(table)


@click.group("steer")
def steer() -> None:
    """Steer a model by switching experts (detect) or by routing tokens to fewer (dyncount):
    write a steering file."""


@steer.command("detect")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--positive", required=True, help=f"Text showing the behaviour. {SOURCE_HELP}")
@click.option("--negative", required=True, help=f"Contrasting text. {SOURCE_HELP}")
@click.option("--method", type=click.Choice(["risk-diff", "rice"]), default="risk-diff", show_default=True,
              help="risk-diff: SteerMoE's risk difference of activation rates between the two sides; "
                   "rice: RICE's nPMI between --markers and each expert over both sides.")
@click.option("--markers", multiple=True,
              help="rice: a marker token (string, tokenized with the model's tokenizer, or an integer id); "
                   "repeat for several.")
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="Experts to choose: in all (risk-diff, default 10) or per layer (rice, default 2); "
                   "--select greedy: the most to choose (default: as many as --budget allows).")
@click.option("--select", "select", type=click.Choice(["score", "log-odds", "greedy"]), default="score",
              show_default=True,
              help="score: the --top best by the method's score; log-odds: rank by the log odds ratio of "
                   "the two sides' activation rates instead of their difference (risk-diff only); greedy: "
                   "add experts one at a time by positive loss gained per negative loss paid, measured "
                   "switched off on --calib-tokens per side drawn with seed --seed + 1, while the negative "
                   "side's perplexity stays within --budget (see moelab.steer.select).")
@click.option("--budget", type=float, default=None,
              help="--select greedy: most the negative side's calibration perplexity may be multiplied by "
                   "(default 1.03).")
@click.option("--calib-tokens", type=click.IntRange(min=1), default=None,
              help="--select greedy: calibration tokens per side (default 4096).")
@click.option("--mode", type=click.Choice(["off", "on", "soft-off", "soft-on", "scale"]), default=None,
              help="What the steering file does to them: hard mask off/on, SteerMoE's soft-off/soft-on, or "
                   "scale their weights (RICE). Default: off (risk-diff), scale (rice).")
@click.option("--strength", type=float, default=None,
              help="soft modes: delta added/subtracted at the row max/min (default 0.01); scale: the factor "
                   "(default 2).")
@click.option("--tokens", type=click.IntRange(min=1), default=16384, show_default=True,
              help="Tokens per side.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the corpus draw.")
@click.option("--show", type=click.IntRange(min=0), default=20, show_default=True, help="Ranking rows to print.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering file to write (JSON, written atomically).")
@no_progress_option
def detect_command(model: Path | None, positive: str, negative: str, method: str, markers: tuple[str, ...],
                   top: int | None, select: str, budget: float | None, calib_tokens: int | None, mode: str | None,
                   strength: float | None, tokens: int, seq_len: int, seed: int, show: int, out: Path,
                   no_progress: bool) -> None:
    """Rank the experts of MODEL (default: the embedded model) by how much more they fire on
    --positive than on --negative, print the ranking and write the chosen ones to --out."""
    from moelab.data import default_model
    from moelab.models import open_model
    from moelab.steer import SteeringEdit, write_steering
    from moelab.steer.detect import detect_experts
    from moelab.steer.rice import detect_rice

    (pos, pos_label), (neg, neg_label) = parse_source(positive, "--positive"), parse_source(negative, "--negative")
    if method == "rice" and not markers:
        raise MoelabError("--markers: the rice method needs at least one marker token")
    if method != "rice" and markers:
        raise MoelabError("--markers: only the rice method uses marker tokens")
    mode = mode or ("scale" if method == "rice" else "off")
    _check_select(select, method, mode, budget, calib_tokens)
    model = model or default_model()
    view = open_model(str(model))
    common = dict(tokens=tokens, seq_len=seq_len, seed=seed, progress=not no_progress)
    if method == "rice":
        marks = [int(m) if m.isdigit() else m for m in markers]
        det = detect_rice(view, pos, marks, negative=neg, label=pos_label, negative_label=neg_label, **common)
    else:
        det = detect_experts(view, pos, neg, positive_label=pos_label, negative_label=neg_label,
                             score="log-odds" if select == "log-odds" else "risk-diff", **common)
    if mode == "scale" and strength is None:
        strength = 2.0
    made = {"method": method, "select": select, "positive": positive, "negative": negative, "sources": det.sources,
            "tokens": det.tokens, "top": top, "command": "moelab steer detect"}
    if select == "greedy":
        chosen, made["greedy"] = _greedy(view, det, (pos, pos_label), (neg, neg_label), top, budget, calib_tokens,
                                         seq_len, seed, not no_progress)
    else:
        chosen = det.select(top or (2 if method == "rice" else 10), mode, per_layer=method == "rice")
    _print_ranking(det, chosen, show, f"{model.name}: {positive} vs {negative} ({det.method}, select {select})")
    spec = write_steering(out, view, SteeringEdit(mode=mode, experts=chosen, strength=strength), made=made,
                          ranking=[r.to_dict() for r in det.rows[:200]])
    click.echo(f"wrote {out}: {spec.describe()}")


def _check_select(select: str, method: str, mode: str, budget: float | None, calib_tokens: int | None) -> None:
    """Named errors for options that do not go together with ``--select``."""
    if select == "log-odds" and method != "risk-diff":
        raise MoelabError("--select log-odds: re-ranks --positive against --negative in place of the risk "
                          "difference; use it with --method risk-diff")
    if select == "greedy" and mode not in ("off", "soft-off"):
        raise MoelabError(f"--select greedy: measures experts switched off; use --mode off or soft-off, not {mode}")
    if select != "greedy":
        for name, value in (("--budget", budget), ("--calib-tokens", calib_tokens)):
            if value is not None:
                raise MoelabError(f"{name}: only --select greedy uses it")


def _greedy(view, det, positive, negative, top, budget, calib_tokens, seq_len, seed, progress):
    """``--select greedy``: the chosen experts and what the steering file records of the run."""
    from moelab.steer.select import GreedyConfig, greedy_from_sources

    config = GreedyConfig(budget=1.03 if budget is None else budget, max_experts=top)

    def report(step) -> None:
        if progress:
            click.echo(f"greedy: layer {step.layer} expert {step.expert}: positive perplexity "
                       f"x{step.ratio_pos:.3f}, negative x{step.ratio_neg:.3f} ({step.evaluated} measured)", err=True)

    got = greedy_from_sources(view, det, positive[0], negative[0], positive_label=positive[1],
                              negative_label=negative[1], config=config, tokens=calib_tokens or 4096,
                              seq_len=seq_len, seed=seed + 1, progress=report)
    last = got.steps[-1]
    click.echo(f"greedy: {len(got.steps)} experts, calibration perplexity positive x{last.ratio_pos:.3f}, "
               f"negative x{last.ratio_neg:.3f} (budget x{config.budget:g}; stopped: {got.stopped})")
    return got.experts, {"steps": [s.to_dict() for s in got.steps], "stopped": got.stopped,
                         "base_loss": got.base_loss, "calibration_tokens": got.tokens, "config": got.config}


@steer.command("dyncount")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--method", required=True, type=click.Choice(["top-k", "top-p", "odp", "top-any"]),
              help="top-k: the family's rule at --k experts; top-p: the fewest experts whose probabilities reach "
                   "--p (Huang et al. 2024); odp: MC-MoE's online dynamic pruning, drop slot j when "
                   "w_j < beta * w_1 (--beta, or calibrated to --target); top-any: MC#'s per-layer gates trained "
                   "to --target.")
@click.option("--k", type=int, default=None, help="top-k: experts per token (at most the model's top_k).")
@click.option("--p", "p", type=float, default=None, help="top-p: probability mass in (0, 1].")
@click.option("--beta", type=float, default=None, help="odp: one threshold for every layer, in [0, 1].")
@click.option("--target", type=float, default=None,
              help="odp / top-any: average active routed experts per token to calibrate or train for.")
@click.option("--cap", type=click.IntRange(min=1), default=None, help="top-p: most experts per token (default top_k).")
@click.option("--protect", type=float, default=0.02, show_default=True,
              help="odp: share of important tokens (largest hidden-state L1 norm) that keep all their experts.")
@click.option("--steps", type=click.IntRange(min=1), default=64, show_default=True, help="top-any: Adam steps.")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), default=None,
              help=f"odp --target / top-any: calibration text ({CORPUS_FORMATS} default: the embedded corpus).")
@click.option("--tokens", type=click.IntRange(min=1), default=8192, show_default=True, help="Calibration tokens.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration draw and training.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Steering file to write (JSON, atomically; top-any's gates beside it as "
                   "<stem>.gates.safetensors).")
@no_progress_option
def dyncount_command(model: Path | None, method: str, k: int | None, p: float | None, beta: float | None,
                     target: float | None, cap: int | None, protect: float, steps: int, corpus: Path | None,
                     tokens: int, seq_len: int, seed: int, out: Path, no_progress: bool) -> None:
    """Write a steering file that routes each token of MODEL (default: the embedded model) to fewer
    experts; `moelab eval`, `generate` and `trace` apply it with --steer."""
    from moelab.data import default_model
    from moelab.models import open_model
    from moelab.steer import DyncountConfig, dyncount_edit, write_steering

    config = DyncountConfig(method=method, k=k, p=p, beta=beta, target=target, cap=cap, protect=protect,
                            steps=steps, tokens=tokens, seq_len=seq_len, seed=seed)
    model = model or default_model()
    view = open_model(str(model))
    edit = dyncount_edit(view, config, corpus, progress=not no_progress)
    made = {"method": method, "command": "moelab steer dyncount",
            **{name: v for name, v in (("k", k), ("p", p), ("beta", beta), ("target", target), ("cap", cap))
               if v is not None}}
    if edit.mode in ("odp", "top-any") and (target is not None):
        made.update(corpus=str(corpus) if corpus else "embedded", tokens=tokens, seq_len=seq_len, seed=seed)
    spec = write_steering(out, view, edit, made=made)
    click.echo(f"wrote {out}: {spec.describe()}")


COMMANDS = [steer]
