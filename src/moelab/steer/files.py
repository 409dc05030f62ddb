"""Steering files: which experts to switch, how, for which model, and how that was found.

A steering file is JSON (never pickle), written atomically::

    {"format": "moelab.steering", "version": 1,
     "model": {...},                       # moelab.trace.fingerprint.model_fingerprint of the model
     "edits": [{"mode": "off", "strength": null, "experts": {"2": [5, 17], "3": [0]}}, ...],
     "made": {"method": "risk-diff", "positive": {...}, "negative": {...}, "date": "...", ...},
     "ranking": [{"layer": 2, "expert": 5, "rate_pos": ..., "score": ..., ...}, ...]}

Modes (each an edit of :mod:`moelab.steer`):

    off        experts_off      hard mask: the experts receive no token
    on         experts_on       forced into every token's top-k with their own score
    soft-off   switch_experts   SteerMoE: logit at the row min - strength (default 0.01), barred
    soft-on    switch_experts   SteerMoE: logit at the row max + strength, forced
    scale      scale_weights    combine weights times ``strength`` (RICE reinforcement)

and the dynamic expert-count modes ``top-k``, ``top-p``, ``odp``, ``top-any`` (their own fields, no
experts named; :mod:`moelab.steer.dynfile`, written by ``moelab steer dyncount``).

``load_steering(path, model)`` checks the file against the model (fingerprint, MoE layers, expert
ids, how many experts a layer can take in the mode); ``apply_steering(model, spec)`` installs the
edits and returns one :class:`moelab.steer.EditHandle` (``remove()``, ``with``). ``moelab generate``,
``eval`` and ``trace`` take such a file with ``--steer``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab import __version__
from moelab.data.atomic import atomic_write_text
from moelab.errors import MoelabError
from moelab.steer.detect import MODES, capacity
from moelab.steer.dynfile import (
    COUNT_MODES,
    CountEdit,
    check_count_fits,
    count_edit_from_dict,
    install_count_edit,
    write_gates,
)
from moelab.steer.edit_kit import EditHandle
from moelab.steer.edits import experts_off, experts_on, scale_weights
from moelab.steer.switch import STEERMOE_DELTA, switch_experts
from moelab.trace.fingerprint import as_view, file_differences, model_fingerprint

FORMAT, VERSION = "moelab.steering", 1


class SteeringFileError(MoelabError):
    """A steering file that cannot be read, or that does not fit the model; names the file."""


@dataclass(frozen=True, kw_only=True)
class SteeringEdit:
    """One edit of a steering file: ``mode`` on ``experts`` (``{layer: [expert, ...]}``).

    ``strength``: delta of the soft modes (default 0.01, SteerMoE's), the factor of ``scale``
    (required), unused (None) for the hard masks.
    """

    mode: str
    experts: dict[int, tuple[int, ...]]
    strength: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MoelabError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.experts, dict) or not self.experts:
            raise MoelabError(f"{self.mode}: experts must be a non-empty {{layer: [expert, ...]}}")
        fixed = {}
        for layer, ids in self.experts.items():
            ids = list(ids) if isinstance(ids, (list, tuple)) else ids
            if not _is_int(layer) or not isinstance(ids, list) or not ids or not all(_is_int(e) for e in ids):
                raise MoelabError(f"{self.mode}: layer {layer!r}: expected an integer layer with a non-empty "
                                  f"list of integer expert ids, got {ids!r}")
            fixed[int(layer)] = tuple(int(e) for e in ids)
        object.__setattr__(self, "experts", fixed)
        s = self.strength
        if self.mode in ("off", "on"):
            if s is not None:
                raise MoelabError(f"{self.mode}: a hard mask takes no strength (got {s!r}); use soft-{self.mode}")
        elif self.mode == "scale":
            if not _is_num(s):
                raise MoelabError(f"scale: strength (the factor) must be a finite number, got {s!r}")
        elif s is None:
            object.__setattr__(self, "strength", STEERMOE_DELTA)
        elif not _is_num(s) or s < 0:
            raise MoelabError(f"{self.mode}: strength must be a finite number >= 0, got {s!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "strength": self.strength,
                "experts": {str(k): list(v) for k, v in sorted(self.experts.items())}}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or (isinstance(x, str) and x.lstrip("-").isdigit())


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True, kw_only=True)
class SteeringSpec:
    """A steering file's content: the edits, the fingerprint of the model they are for, and how
    they were made (``made``: method, sources, date, moelab version; ``ranking``: detection rows)."""

    edits: tuple[SteeringEdit | CountEdit, ...]
    fingerprint: dict[str, Any]
    made: dict[str, Any] = field(default_factory=dict)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.fingerprint,
                "edits": [e.to_dict() for e in self.edits], "made": self.made, "ranking": self.ranking}

    def describe(self) -> str:
        """One line: the modes, how many experts in which layers."""
        parts = [e.describe() if isinstance(e, CountEdit) else
                 f"{e.mode}{'' if e.strength is None else f'({e.strength:g})'} "
                 f"{sum(len(v) for v in e.experts.values())} experts in layers {sorted(e.experts)}"
                 for e in self.edits]
        return "; ".join(parts)


def make_steering(model: Any, edits: list[SteeringEdit | CountEdit] | SteeringEdit | CountEdit, *, made: dict[str, Any] | None = None,
                  ranking: list[dict[str, Any]] | None = None) -> SteeringSpec:
    """A spec for ``model`` (checked against it), stamped with today's date and moelab's version."""
    view = as_view(model)
    edits = (edits,) if isinstance(edits, (SteeringEdit, CountEdit)) else tuple(edits)
    info = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "moelab": __version__}
    spec = SteeringSpec(edits=edits, fingerprint=model_fingerprint(view), made={**info, **(made or {})},
                        ranking=list(ranking or []))
    check_fits(spec, view, "steering")
    return spec


def write_steering(path: str | os.PathLike, model: Any,
                   edits: list[SteeringEdit | CountEdit] | SteeringEdit | CountEdit, *,
                   made: dict[str, Any] | None = None, ranking: list[dict[str, Any]] | None = None
                   ) -> SteeringSpec:
    """Write a steering file for ``model`` atomically (see :func:`make_steering`); returns the spec.
    A top-any edit's gates go first to ``<stem>.gates.safetensors`` beside it."""
    spec = make_steering(model, edits, made=made, ranking=ranking)
    spec = SteeringSpec(edits=tuple(write_gates(e, Path(path)) if isinstance(e, CountEdit) else e
                                    for e in spec.edits),
                        fingerprint=spec.fingerprint, made=spec.made, ranking=spec.ranking)
    atomic_write_text(Path(path), json.dumps(spec.to_dict(), indent=1) + "\n")
    return SteeringSpec(edits=spec.edits, fingerprint=spec.fingerprint, made=spec.made, ranking=spec.ranking,
                        path=str(path))


def _fp_line(fp: dict[str, Any]) -> str:
    return (f"{fp.get('architecture')} (config {str(fp.get('config_hash'))[:12]}, "
            f"routers {str(fp.get('router_hash'))[:12]})")


def check_fits(spec: SteeringSpec, view: Any, where: str) -> None:
    """Raise :class:`SteeringFileError` (prefixed ``where``) unless every edit fits the model."""
    blocks = {b.layer: b for b in view.blocks}
    for edit in spec.edits:
        if isinstance(edit, CountEdit):
            try:
                check_count_fits(edit, view, where)
            except MoelabError as err:
                raise SteeringFileError(str(err)) from None
            continue
        for layer, ids in edit.experts.items():
            if layer not in blocks:
                raise SteeringFileError(f"{where}: {edit.mode}: layer {layer} is not an MoE layer of the model "
                                        f"(MoE layers: {sorted(blocks)})")
            b = blocks[layer]
            bad = [e for e in ids if not 0 <= e < b.num_experts]
            if bad or len(set(ids)) != len(ids):
                raise SteeringFileError(f"{where}: {edit.mode}: layer {layer}: expert ids {list(ids)} must be "
                                        f"distinct and in [0, {b.num_experts})")
            cap = capacity(edit.mode, b.num_experts, b.top_k)
            if len(ids) > cap:
                raise SteeringFileError(f"{where}: {edit.mode}: layer {layer}: {len(ids)} experts, but a layer "
                                        f"with {b.num_experts} experts, top-{b.top_k} takes at most {cap}")


def load_steering(path: str | os.PathLike, model: Any) -> SteeringSpec:
    """Read a steering file and check it against ``model`` (a model, view or checkpoint dir)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SteeringFileError(f"steering file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SteeringFileError(f"steering file {path}: not readable JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SteeringFileError(f"steering file {path}: 'format' must be {FORMAT!r} (written by "
                                "`moelab steer detect` or moelab.steer.write_steering)")
    if doc.get("version") != VERSION:
        raise SteeringFileError(f"steering file {path}: version {doc.get('version')!r}, this moelab reads {VERSION}")
    try:
        edits = tuple(count_edit_from_dict(e, path.parent) if e["mode"] in COUNT_MODES else
                      SteeringEdit(mode=e["mode"], experts=e["experts"], strength=e.get("strength"))
                      for e in doc["edits"])
        fp = doc["model"]
        spec = SteeringSpec(edits=edits, fingerprint=fp, made=doc.get("made") or {},
                            ranking=doc.get("ranking") or [], path=str(path))
    except (KeyError, TypeError, AttributeError) as err:
        raise SteeringFileError(f"steering file {path}: missing or malformed field {err}") from None
    except MoelabError as err:
        raise SteeringFileError(f"steering file {path}: {err}") from None
    if not edits:
        raise SteeringFileError(f"steering file {path}: 'edits' is empty")
    view = as_view(model)
    current = model_fingerprint(view)
    diffs = file_differences(fp, current)
    if diffs:
        detail = "; ".join(diffs)
        raise SteeringFileError(f"steering file {path} was written for another model: file {_fp_line(fp)}, "
                                f"model {_fp_line(current)}: {detail}")
    check_fits(spec, view, f"steering file {path}")
    return spec


def apply_steering(model: Any, spec: SteeringSpec) -> EditHandle:
    """Install the spec's edits on ``model`` in file order; one handle removes them all.

    Soft-on and soft-off of the same strength go into one :func:`switch_experts` edit (SteerMoE
    applies both in one pass). With several edits, the handle's ``counts[layer]`` adds the edits'
    counts (``tokens`` is each layer's, counted once).
    """
    view = as_view(model)
    check_fits(spec, view, f"steering file {spec.path}" if spec.path else "steering")
    parts: list[EditHandle] = []
    try:
        for edit in _merged(spec.edits):
            parts.append(_install_edit(view, edit))
    except BaseException:
        for h in parts:
            h.remove()
        raise
    return parts[0] if len(parts) == 1 else _SteeringHandle(parts)


def _merged(edits: tuple[SteeringEdit | CountEdit, ...]) -> list[tuple[str, Any, float | None]]:
    """``(kind, payload, strength)`` per edit to install; soft edits of one strength merged."""
    out: list[tuple[str, Any, float | None]] = []
    for e in edits:
        if isinstance(e, CountEdit):
            out.append(("count", e, None))
        elif e.mode in ("soft-on", "soft-off"):
            side = "on" if e.mode == "soft-on" else "off"
            prev = next((x for x in out if x[0] == "switch" and x[2] == e.strength
                         and not set(x[1][side]) & set(e.experts)), None)
            if prev is None:
                prev = ("switch", {"on": {}, "off": {}}, e.strength)
                out.append(prev)
            prev[1][side].update({k: list(v) for k, v in e.experts.items()})
        else:
            out.append((e.mode, e.experts, e.strength))
    return out


def _install_edit(view: Any, edit: tuple[str, Any, float | None]) -> EditHandle:
    kind, experts, strength = edit
    if kind == "count":
        return install_count_edit(view, experts)
    if kind == "switch":
        return switch_experts(view, on=experts["on"], off=experts["off"], strength=strength)
    if kind == "off":
        return experts_off(view, {k: list(v) for k, v in experts.items()})
    if kind == "on":
        return experts_on(view, {k: list(v) for k, v in experts.items()})
    return scale_weights(view, {k: {e: strength for e in v} for k, v in experts.items()})


class _SteeringHandle(EditHandle):
    """One handle over several installed edits; ``counts`` sums theirs per layer when read."""

    def __init__(self, parts: list[EditHandle]) -> None:
        self._parts = parts
        super().__init__("steering", sorted({layer for h in parts for layer in h.counts}))
        self._handles = [h for p in parts for h in p._handles]

    @property
    def counts(self) -> dict[int, dict[str, int]]:  # type: ignore[override]
        out: dict[int, dict[str, int]] = {}
        for p in self._parts:
            for layer, c in p.counts.items():
                tgt = out.setdefault(layer, {"tokens": 0, "affected": 0})
                for key, n in c.items():
                    tgt[key] = max(tgt.get(key, 0), n) if key == "tokens" else tgt.get(key, 0) + n
        return out

    def reset(self) -> None:
        for p in self._parts:
            p.reset()


__all__ = ["SteeringEdit", "SteeringFileError", "SteeringSpec", "apply_steering", "check_fits", "load_steering",
           "make_steering", "write_steering"]
