"""``moelab models`` (supported families) and ``moelab inspect`` (a model's MoE blocks)."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.errors import MoelabError


def _fmt(n: int) -> str:
    """Parameter count in a readable unit: 950, 12.3 K, 4.56 M, 7.89 B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


@click.command("models")
def models() -> None:
    """List the supported transformers MoE families."""
    from rich.console import Console
    from rich.table import Table

    from moelab.models.families import ADAPTERS

    table = Table(title="Supported MoE families (moelab inspect PATH shows a model's blocks)")
    for col in ("family", "config model_type", "transformers config", "MoE block class"):
        table.add_column(col, overflow="fold")
    for a in ADAPTERS:
        table.add_row(
            a.name, ", ".join(a.model_types), a.example_config, ", ".join(a.block_classes)
        )
    Console().print(table)


def _default_model_path() -> Path:
    try:
        from moelab.data import default_model
    except ImportError:
        default_model = None
    if default_model is None:
        raise MoelabError(
            "inspect: no default model is shipped with this install; give a PATH to a model directory"
        )
    return Path(default_model())


def _routing(b) -> str:
    parts = [b.scoring, f"top-{b.top_k}"]
    if b.norm_topk_prob:
        parts.append("renorm" if b.norm_p == 1.0 else f"p{b.norm_p:g}-norm")
    if b.n_group:
        parts.append(f"groups {b.topk_group}/{b.n_group}")
    if b.correction_bias is not None:
        parts.append("corr-bias")
    if b.router_bias is not None:
        parts.append("bias")
    if b.routed_scaling_factor != 1.0:
        parts.append(f"x{b.routed_scaling_factor:g}")
    return " ".join(parts)


def _shared(b) -> str:
    if b.shared is None:
        return "-"
    return f"I={b.shared.intermediate_size}" + (
        " +gate" if b.shared.gate_weight is not None else ""
    )


@click.command("inspect")
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow the checkpoint's own Python code (off by default).",
)
def inspect(path: Path | None, trust_remote_code: bool) -> None:
    """Show the MoE blocks of the model at PATH (a local safetensors checkpoint directory).

    Without PATH, the default model shipped with moelab is shown. Only config.json and the
    safetensors headers are read (the model is built on the meta device), so a checkpoint of any
    size is inspected in little memory; the headers are checked against the config.
    """
    from rich.console import Console
    from rich.table import Table

    from moelab.models.checkpoint import load_meta_model
    from moelab.models.open import view_model
    from moelab.offload.store import ExpertStore, SafetensorsIndex, map_checkpoint

    path = path if path is not None else _default_model_path()
    model = load_meta_model(path, trust_remote_code=trust_remote_code)
    map_checkpoint(SafetensorsIndex(path), model)  # every tensor's shape against the config
    view = view_model(model)
    ExpertStore(path, model, view).close()  # and every expert's tensors present
    first = view.blocks[0]
    pattern = first.path.replace(f".{first.layer}.", ".{layer}.", 1)
    table = Table(
        title=f"{view.family} ({type(view.model).__name__}) from {path}\nMoE blocks at {pattern}, "
        f"experts stored as {first.layout}"
    )
    for col in ("layer", "E", "top-k", "I", "routing", "shared experts", "expert params"):
        numeric = col in ("layer", "E", "top-k", "I", "expert params")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=numeric)
    for b in view.blocks:
        table.add_row(
            str(b.layer),
            str(b.num_experts),
            str(b.top_k),
            str(b.intermediate_size),
            _routing(b),
            _shared(b),
            _fmt(b.expert_params() + b.shared_params()),
        )
    console = Console()
    console.print(table)
    counts = view.param_counts()
    dense = ", ".join(map(str, view.dense_layers)) or "none"
    console.print(
        f"{len(view.blocks)} MoE block(s) in {view.num_layers} layers (dense layers: {dense})\n"
        f"parameters: routed experts {_fmt(counts['routed'])}, shared experts {_fmt(counts['shared'])}, "
        f"rest {_fmt(counts['rest'])}, total {_fmt(counts['total'])} "
        f"({100 * (counts['routed'] + counts['shared']) / counts['total']:.1f} % in experts)",
        soft_wrap=True,
    )


COMMANDS = [models, inspect]
