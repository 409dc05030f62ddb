"""Training checkpoints: written as a whole folder under a temporary name and renamed when complete.

``<run>/checkpoint/`` holds

- ``model.safetensors``: the weights (``safetensors.torch.save_model``, which handles tied weights);
- ``optimizer.pt``: the AdamW state dict, tensors only, read back with ``torch.load(weights_only=True)``
  so loading never runs pickled code;
- ``rng.safetensors``: the data-sampling generator's state and torch's global CPU RNG state;
- ``state.json``: step, tokens seen, wall time so far, and the run's config fingerprint.

A run refuses to resume from a checkpoint whose fingerprint differs from its own config, naming the
fields that differ: continuing another config's optimizer state would silently train something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from moelab.data.atomic import atomic_dir
from moelab.errors import CheckpointError

CHECKPOINT = "checkpoint"
FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", "state.json")


@dataclass
class TrainState:
    """Where a run stands: optimizer steps done, tokens consumed, training seconds spent."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


def save_checkpoint(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                    state: TrainState, fingerprint: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint`` atomically (an interrupted save leaves the previous one intact)."""
    final = Path(run_dir) / CHECKPOINT
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        save_file({"data_gen": gen.get_state(), "torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        meta = {"step": state.step, "tokens": state.tokens, "elapsed_s": state.elapsed_s, "fingerprint": fingerprint}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return final


def read_checkpoint_meta(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's ``state.json``, or None when the run folder has no checkpoint yet."""
    ckpt = Path(run_dir) / CHECKPOINT
    if not ckpt.exists():
        return None
    missing = [f for f in FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt}: missing {', '.join(missing)} (not written by `moelab train`?)")
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {ckpt}/state.json: not valid JSON ({err})") from err


def check_fingerprint(run_dir: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming every field where the checkpoint's config differs from ours."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(
            f"refusing to resume from {Path(run_dir) / CHECKPOINT}: it was written by a run with another "
            f"config or corpus ({'; '.join(diffs)}); use another --out folder or the same settings"
        )


def load_checkpoint(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    gen: torch.Generator) -> TrainState:
    """Restore model, optimizer and RNG state in place from ``run_dir/checkpoint``; return its state."""
    ckpt = Path(run_dir) / CHECKPOINT
    meta = read_checkpoint_meta(run_dir)
    if meta is None:
        raise CheckpointError(f"checkpoint {ckpt}: not found")
    missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise CheckpointError(f"checkpoint {ckpt}/model.safetensors: tensors do not match the model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    rng = load_file(str(ckpt / "rng.safetensors"))
    gen.set_state(rng["data_gen"])
    torch.set_rng_state(rng["torch_cpu"])
    return TrainState(step=int(meta["step"]), tokens=int(meta["tokens"]), elapsed_s=float(meta["elapsed_s"]))
