"""The training log (``train.jsonl``: one JSON object per line) and its loss-curve plot (``loss.png``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelab.data.atomic import atomic_write, atomic_write_text

LOG = "train.jsonl"
PLOT = "loss.png"


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """All complete records of ``run_dir/train.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / LOG
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_log(run_dir: Path, step: int) -> None:
    """Drop records after ``step`` (written after the checkpoint a run resumes from), atomically."""
    rows = [r for r in read_log(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(Path(run_dir) / LOG, "".join(json.dumps(r) + "\n" for r in rows))


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record and flush it, so a crash loses at most the line being written."""
    with open(Path(run_dir) / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def loss_curve(run_dir: Path, points: int = 100) -> dict[str, Any]:
    """The training curve, compact enough for a model card: train cross-entropy averaged over at most
    ``points`` equal runs of logged steps (``tokens``, ``train_ce``), and every validation record
    (``val``: domain -> ``[[tokens, loss], ...]``)."""
    rows = read_log(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    size = max(1, -(-len(train) // points))  # ceil: at most `points` buckets
    buckets = [train[i:i + size] for i in range(0, len(train), size)]
    val: dict[str, list[list[float]]] = {}
    for r in rows:
        if r.get("kind") == "eval":
            for domain, loss in r["val_loss"].items():
                val.setdefault(domain, []).append([r["tokens"], round(loss, 4)])
    return {"tokens": [b[-1]["tokens"] for b in buckets],
            "train_ce": [round(sum(r["ce"] for r in b) / len(b), 4) for b in buckets], "val": val}


def plot_loss(run_dir: Path) -> Path | None:
    """Plot training cross-entropy (and validation loss per domain where logged) to ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] / 1e6 for r in train], [r["ce"] for r in train], lw=0.8, label="train (cross-entropy)")
    evals = [r for r in rows if r.get("kind") == "eval"]
    for domain in sorted({d for r in evals for d in r["val_loss"]}):
        pts = [(r["tokens"] / 1e6, r["val_loss"][domain]) for r in evals if domain in r["val_loss"]]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"val {domain}")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"moelab training: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out
