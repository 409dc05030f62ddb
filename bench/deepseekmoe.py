"""The DeepSeekMoE comparison table: moelab's fine-grained, coarse and dense models at one token budget.

    python bench/deepseekmoe.py          # the shipped models that exist, on the shipped corpus
    python bench/deepseekmoe.py --models fine=runs/fine-export,coarse=src/moelab/assets/models/coarse

Re-measures each model's per-domain validation perplexity (``moelab.run.evaluate``, the model
card's slice) and reads parameters, tokens and training time from its card; expert load gives the
dead experts (under 1 % of a layer's assignments) and the lowest normalised load entropy. Writes
``bench/results/deepseekmoe.json`` and ``bench/results/deepseekmoe.md`` (see
:mod:`moelab.train.compare`). A model not shipped yet is listed as missing.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import moelab
from moelab.data import MODEL_NAMES
from moelab.errors import MoelabError
from moelab.train.compare import compare_models, markdown_table, rows_to_json


def _model_dirs(spec: str | None) -> tuple[dict[str, Path], list[str]]:
    if spec:
        pairs = [item.split("=", 1) for item in spec.split(",")]
        return {name: Path(path) for name, path in pairs}, []
    found, missing = {}, []
    for name in MODEL_NAMES:
        try:
            found[name] = moelab.default_model(name)
        except MoelabError:
            missing.append(name)
    return found, missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="name=folder,... (default: the shipped fine, coarse, dense)")
    ap.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the shipped corpus)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "deepseekmoe.json")
    args = ap.parse_args()
    dirs, missing = _model_dirs(args.models)
    rows = compare_models(dirs, args.corpus or moelab.default_corpus())
    table = markdown_table(rows)
    note = f"\nNot shipped yet: {', '.join(missing)}.\n" if missing else ""
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(table + note)
    report = {"when": when, "machine": machine, "command": "python bench/deepseekmoe.py", "missing": missing,
              "rows": rows_to_json(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((args.out, json.dumps(report, indent=1) + "\n"),
                       (args.out.with_suffix(".md"), f"{table}{note}\n`python bench/deepseekmoe.py`, {when}, {machine}.\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
