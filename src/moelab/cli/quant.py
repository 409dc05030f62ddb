"""``moelab quantize``: quantise the routed experts of a checkpoint (RTN, GPTQ or EAQuant, every expert calibrated)
and write a dequantised or compressed-tensors checkpoint (see :mod:`moelab.compress.quant`)."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.cli._options import CORPUS_FORMATS, no_progress_option


@click.command("quantize")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["rtn", "gptq", "eaquant"]), default="gptq", show_default=True,
              help="rtn: round to nearest; gptq: GPTQ with each expert's Hessian from the tokens routed to it; "
                   "eaquant: EAQuant (smoothing shared by router and experts, calibration balance, routers "
                   "aligned to full-precision routing by KL), then GPTQ.")
@click.option("--act-bits", type=click.Choice(["4", "8"]), default=None,
              help="Per-token activation bits of the expert linears (W4A4, W4A8): simulated by fake "
                   "quantisation and recorded in quant.json (the checkpoint stores weights); EAQuant aligns "
                   "its routers under them.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="EAQuant: smoothing migration strength.")
@click.option("--bits", type=int, default=4, show_default=True, help="Bits per expert weight: 2, 3, 4 or 8.")
@click.option("--group", "group", type=int, default=64, show_default=True,
              help="Input features per scale (must divide every expert's input dim); 0: one scale per row.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (zero point 0) or asymmetric.")
@click.option("--format", "fmt", type=click.Choice(["dequantized", "compressed-tensors"]), default="dequantized",
              show_default=True, help="dequantized: a stock checkpoint of (q - zero) * scale; compressed-tensors: "
              "packed int32 weights that transformers (with the compressed-tensors package) and vLLM read.")
@click.option("--avg-bits", type=float, default=None,
              help="Mixed precision: an average-bits budget per expert weight (per layer), e.g. 2.5; bits per "
                   "expert from 2, 3, 4 chosen by --allocate.")
@click.option("--allocate", type=click.Choice(["pmq", "greedy", "uniform"]), default="pmq", show_default=True,
              help="With --avg-bits: pmq (MC-MoE's integer program: importance x quantisation loss, HiGHS), "
                   "greedy, or uniform.")
@click.option("--calib", type=click.Path(exists=True, path_type=Path), default=None,
              help=f"Calibration corpus (GPTQ). {CORPUS_FORMATS} Default: the embedded corpus (train split).")
@click.option("--calib-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Calibration tokens.")
@click.option("--calib-label", default=None, help="Calibrate on one label (domain) only, e.g. code.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--min-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Experts routed fewer calibration tokens are recalibrated on all tokens.")
@click.option("--cap", type=click.IntRange(min=1), default=None,
              help="At most this many routed tokens per expert (EAQuant's calibration balance).")
@click.option("--all-experts", is_flag=True, help="Calibrate every expert on all tokens (calibrate-all-experts).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration draw.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for the quantised checkpoint (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@no_progress_option
def quantize_command(model: Path | None, method: str, act_bits: str | None, alpha: float, bits: int, group: int,
                     sym: bool, fmt: str,
                     avg_bits: float | None, allocate: str, calib: Path | None, calib_tokens: int, calib_label: str | None, seq_len: int,
                     min_tokens: int, cap: int | None, all_experts: bool, seed: int, out: Path,
                     overwrite: bool, no_progress: bool) -> None:
    """Quantise the routed experts of MODEL (default: the embedded model) and write a checkpoint to --out.

    Routers, shared experts, dense layers, attention and the LM head stay in full precision.
    """
    from moelab.cli._options import embedded_default
    from moelab.compress.quant import CalibPolicy, QuantConfig, QuantSpec
    from moelab.compress.quant.act import ActQuantConfig
    from moelab.compress.quant.eaquant import EAQuantConfig
    from moelab.compress.quant.pipeline import quantize_checkpoint
    from moelab.compress.quant.pmq import PMQConfig

    spec = QuantSpec("gptq" if method == "eaquant" else method, QuantConfig(bits, group or None, sym),
                     policy=CalibPolicy(min_tokens, cap, all_experts))
    act = None if act_bits is None else ActQuantConfig(int(act_bits))
    ea = EAQuantConfig(alpha=alpha) if method == "eaquant" else None
    pmq = PMQConfig(avg_bits) if avg_bits is not None else None
    model = model or embedded_default("default_model", "MODEL")
    run = quantize_checkpoint(model, spec, out=out, format=fmt, overwrite=overwrite, calib_corpus=calib,
                              calib_tokens=calib_tokens, calib_label=calib_label, seq_len=seq_len, seed=seed,
                              pmq=pmq, allocate=allocate, eaquant=ea, act=act, progress=not no_progress)
    cal = run.result.calibration
    if cal is not None:
        click.echo(f"calibration: {cal['experts']} experts, routed tokens per expert min {cal['routed_tokens_min']} "
                   f"/ median {cal['routed_tokens_median']:.0f} / max {cal['routed_tokens_max']}; "
                   f"{cal['recalibrated_on_all_tokens']} recalibrated on all tokens; "
                   f"{cal['uncalibrated']} uncalibrated experts")
    for layer, a in (run.result.extra.get("alignment") or {}).items():
        click.echo(f"router alignment, layer {layer}: KL(full precision || quantised routing) "
                   f"{a['kl_before']:.4g} -> {a['kl_after']:.4g} nats per calibration token")
    name = f"{method} {spec.config.describe()}" if pmq is None else \
        f"{method} + {allocate} (budget {avg_bits} bits, from {list(pmq.candidates)})"
    if act is not None:
        name += f", activations {act.describe()} (simulated, not stored)"
    click.echo(f"{name}: {run.result.average_bits():.2f} bits per expert weight, "
               f"{fmt} checkpoint {run.bytes_before / 1e6:.2f} MB -> {run.bytes_after / 1e6:.2f} MB -> {run.out} "
               f"({run.seconds:.1f} s)")


COMMANDS = [quantize_command]
