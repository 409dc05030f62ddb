"""Dynamic expert-count edits in steering files: the fewer-experts methods of
:mod:`moelab.steer.dyncount`, :mod:`moelab.steer.topp`, :mod:`moelab.steer.mcmoe` and
:mod:`moelab.steer.topany`, calibrated once and applied with ``--steer`` like any steering file.

An edit of a steering file (see :mod:`moelab.steer.files`) in one of these modes::

    {"mode": "top-k",   "values": {"1": 6, ...}}                         fixed_top_k: k' per layer
    {"mode": "top-p",   "values": {"1": 0.6, ...}, "cap": null}          top_p: p per layer
    {"mode": "odp",     "values": {"1": 0.38, ...}, "tau": {"1": 41.2}}  MC-MoE ODP: beta_l, tau_l
                                                                          (null tau: no protected token)
    {"mode": "top-any", "gates": "steer.gates.safetensors"}              MC# top-any gates (file
                                                                          beside the steering file)

plus ``"renormalize": true`` (kept weights rescaled to the token's original total). The gates of
top-any are tensors (``[E, H]`` per layer), so they live in a safetensors file named relative to the
steering file, written atomically before it, read without unpickling.

:func:`dyncount_edit` builds an edit for a model: top-k and top-p from their one parameter, ODP from
a given ``beta`` or calibrated to a target of active experts per token on a corpus, top-any trained
to a target (started from ODP's thresholds at that target, the better start in
``docs/results/dyncount.md``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError
from moelab.steer.edit_kit import EditHandle

COUNT_MODES = ("top-k", "top-p", "odp", "top-any")
_VALUE = {"top-k": "k", "top-p": "p", "odp": "beta"}


@dataclass(frozen=True, kw_only=True)
class CountEdit:
    """A dynamic expert-count edit: ``mode`` with per-layer ``values`` (k', p or beta), ODP's ``tau``
    (None: no protected token), top-p's ``cap``, top-any's ``gates`` file name and/or ``module``
    (the :class:`moelab.steer.topany.TopAnyGates`, not serialised)."""

    mode: str
    values: dict[int, float] = field(default_factory=dict)
    tau: dict[int, float | None] = field(default_factory=dict)
    cap: int | None = None
    gates: str | None = None
    renormalize: bool = True
    module: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in COUNT_MODES:
            raise MoelabError(f"mode: expected one of {', '.join(COUNT_MODES)}, got {self.mode!r}")
        if not isinstance(self.renormalize, bool):
            raise MoelabError(f"{self.mode}: renormalize must be true or false, got {self.renormalize!r}")
        if self.mode == "top-any":
            if self.values or (self.gates is None and self.module is None):
                raise MoelabError("top-any: expected a gates file (and no per-layer values)")
            return
        if not isinstance(self.values, dict) or not self.values:
            raise MoelabError(f"{self.mode}: values must be a non-empty {{layer: {_VALUE[self.mode]}}}")
        object.__setattr__(self, "values", {_layer(k, self.mode): _value(self.mode, v, k)
                                            for k, v in self.values.items()})
        if self.mode == "odp":
            tau = {_layer(k, "odp"): _tau(v, k) for k, v in (self.tau or {}).items()}
            if set(tau) - set(self.values):
                raise MoelabError(f"odp: tau names layers {sorted(set(tau) - set(self.values))} without a beta")
            object.__setattr__(self, "tau", tau)
        if self.cap is not None and (isinstance(self.cap, bool) or not isinstance(self.cap, int) or self.cap < 1):
            raise MoelabError(f"top-p: cap must be a positive integer or null, got {self.cap!r}")

    @property
    def experts(self) -> dict[int, tuple[int, ...]]:
        """No expert is switched by name (for readers of every edit's ``experts``)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "renormalize": self.renormalize}
        if self.mode == "top-any":
            out["gates"] = self.gates
            return out
        out["values"] = {str(k): v for k, v in sorted(self.values.items())}
        if self.mode == "odp":
            out["tau"] = {str(k): self.tau.get(k) for k in sorted(self.values)}
        if self.mode == "top-p":
            out["cap"] = self.cap
        return out

    def describe(self) -> str:
        if self.mode == "top-any":
            return f"top-any gates {self.gates or '(in memory)'}"
        vals = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.values.items()))
        return f"{self.mode} ({_VALUE[self.mode]} per layer {vals})"


def _layer(key: Any, mode: str) -> int:
    if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
        raise MoelabError(f"{mode}: layer {key!r}: expected an integer layer")
    return int(key)


def _value(mode: str, v: Any, layer: Any) -> float:
    name = _VALUE[mode]
    if mode == "top-k":
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MoelabError(f"top-k: layer {layer}: k must be an integer >= 1, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MoelabError(f"{mode}: layer {layer}: {name} must be a number, got {v!r}")
    if mode == "top-p" and not 0 < v <= 1:
        raise MoelabError(f"top-p: layer {layer}: p must lie in (0, 1], got {v!r}")
    if mode == "odp" and not 0 <= v <= 1:
        raise MoelabError(f"odp: layer {layer}: beta must lie in [0, 1], got {v!r}")
    return float(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tau(v: Any, layer: Any) -> float | None:
    if v is None or (isinstance(v, float) and math.isinf(v) and v > 0):
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise MoelabError(f"odp: layer {layer}: tau must be a number >= 0 or null, got {v!r}")
    return float(v)


def count_edit_from_dict(doc: dict[str, Any], base: Path) -> CountEdit:
    """A :class:`CountEdit` from its JSON object; a top-any gates file is read from ``base``."""
    known = {"mode", "values", "tau", "cap", "gates", "renormalize"}
    extra = set(doc) - known
    if extra:
        raise MoelabError(f"{doc.get('mode')}: unknown field(s) {sorted(extra)} (expected {sorted(known)})")
    edit = CountEdit(mode=doc["mode"], values=doc.get("values") or {}, tau=doc.get("tau") or {},
                     cap=doc.get("cap"), gates=doc.get("gates"), renormalize=doc.get("renormalize", True))
    if edit.mode == "top-any":
        if not isinstance(edit.gates, str) or not edit.gates:
            raise MoelabError(f"top-any: gates must be a file name, got {edit.gates!r}")
        object.__setattr__(edit, "module", _read_gates(base / edit.gates))
    return edit


def _read_gates(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise MoelabError(f"top-any: gates file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MoelabError(f"top-any: gates file {path} is not a readable safetensors file ({err})") from None


def gates_module(edit: CountEdit, view: Any, where: str):
    """The edit's :class:`TopAnyGates` for ``view``; a state dict read from a file is checked
    against the model (every MoE layer, ``[E, H]`` gate weights) and loaded."""
    from moelab.steer.topany import TopAnyGates

    if isinstance(edit.module, TopAnyGates):
        return edit.module
    gates = TopAnyGates(view)
    want = {k: tuple(v.shape) for k, v in gates.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in edit.module.items()}
    if want != got:
        missing = sorted(set(want) - set(got))
        bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise MoelabError(f"{where}: top-any: the gates file {edit.gates} was made for another model "
                          f"(missing {missing or 'none'}, other shapes {bad or 'none'}, "
                          f"unexpected {sorted(set(got) - set(want)) or 'none'})")
    gates.load_state_dict({k: v.float() for k, v in edit.module.items()})
    gates.eval()
    object.__setattr__(edit, "module", gates)
    return gates


def check_count_fits(edit: CountEdit, view: Any, where: str) -> None:
    """Raise a :class:`MoelabError` (prefixed ``where``) unless ``edit`` fits the model."""
    blocks = {b.layer: b for b in view.blocks}
    for layer, v in edit.values.items():
        if layer not in blocks:
            raise MoelabError(f"{where}: {edit.mode}: layer {layer} is not an MoE layer of the model "
                              f"(MoE layers: {sorted(blocks)})")
        b = blocks[layer]
        if edit.mode == "top-k" and v > b.top_k:
            raise MoelabError(f"{where}: top-k: layer {layer}: k={v} but the layer routes to top_k={b.top_k}")
        if edit.mode == "top-p" and edit.cap is not None and edit.cap > b.num_experts:
            raise MoelabError(f"{where}: top-p: cap {edit.cap} > the layer's {b.num_experts} experts")
    if edit.mode == "top-any":
        gates_module(edit, view, where)


def install_count_edit(view: Any, edit: CountEdit) -> EditHandle:
    """Install ``edit`` on ``view`` (one handle)."""
    from moelab.steer.dyncount import fixed_top_k
    from moelab.steer.mcmoe import ODPCalibration, online_dynamic_pruning
    from moelab.steer.topany import top_any
    from moelab.steer.topp import top_p

    if edit.mode == "top-k":
        return fixed_top_k(view, dict(edit.values))
    if edit.mode == "top-p":
        return top_p(view, dict(edit.values), cap=edit.cap, renormalize=edit.renormalize)
    if edit.mode == "odp":
        tau = {layer: math.inf if edit.tau.get(layer) is None else edit.tau[layer] for layer in edit.values}
        return online_dynamic_pruning(view, ODPCalibration(dict(edit.values), tau), edit.renormalize)
    return top_any(view, gates_module(edit, view, "steering"), edit.renormalize)


def write_gates(edit: CountEdit, steering_path: Path) -> CountEdit:
    """Write a top-any edit's gates beside ``steering_path`` (``<stem>.gates.safetensors``, atomically);
    returns the edit naming that file. Other edits come back as they are."""
    if edit.mode != "top-any" or edit.module is None:
        return edit
    from safetensors.torch import save_file

    from moelab.data.atomic import atomic_write

    state = edit.module.state_dict() if hasattr(edit.module, "state_dict") else edit.module
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    name = f"{steering_path.stem}.gates.safetensors"
    atomic_write(steering_path.parent / name, lambda tmp: save_file(state, str(tmp)))
    return CountEdit(mode="top-any", gates=name, renormalize=edit.renormalize, module=edit.module)


@dataclass(frozen=True, kw_only=True)
class DyncountConfig:
    """How :func:`dyncount_edit` makes an edit: ``k`` (top-k), ``p`` (top-p), ``beta`` (ODP
    without calibration) or ``target`` active experts per token (ODP calibrated, top-any trained);
    calibration on ``tokens`` tokens (``seq_len``) of ``corpus``'s training split; ``protect``:
    ODP's share of important tokens; ``steps``: top-any's Adam steps."""

    method: str
    k: int | None = None
    p: float | None = None
    beta: float | None = None
    target: float | None = None
    cap: int | None = None
    protect: float = 0.02
    steps: int = 64
    tokens: int = 8192
    seq_len: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in COUNT_MODES:
            raise MoelabError(f"method: expected one of {', '.join(COUNT_MODES)}, got {self.method!r}")
        need = {"top-k": ("k",), "top-p": ("p",), "odp": ("beta", "target"), "top-any": ("target",)}[self.method]
        given = [n for n in ("k", "p", "beta", "target") if getattr(self, n) is not None]
        if sum(n in need for n in given) != 1 or set(given) - set(need):
            raise MoelabError(f"{self.method}: give exactly one of {' / '.join('--' + n for n in need)} "
                              f"(got {', '.join('--' + n for n in given) or 'none'})")
        if self.beta is not None and not (_is_number(self.beta) and 0 <= self.beta <= 1):
            raise MoelabError(f"odp: --beta must lie in [0, 1] (slot j is dropped when w_j < beta * w_1), "
                              f"got {self.beta!r}")
        if self.p is not None and not (_is_number(self.p) and 0 < self.p <= 1):
            raise MoelabError(f"top-p: --p must lie in (0, 1], got {self.p!r}")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, (int, float))
                                        or not self.target >= 1):
            raise MoelabError(f"{self.method}: target must be a number of experts >= 1, got {self.target!r}")
        if not 0 <= self.protect < 1:
            raise MoelabError(f"odp: protect must lie in [0, 1), got {self.protect!r}")


def dyncount_edit(view: Any, config: DyncountConfig, corpus: str | os.PathLike | None = None, *,
                  progress: bool = False) -> CountEdit:
    """The :class:`CountEdit` of ``config`` for ``view``; ODP (with a target) and top-any calibrate on
    ``corpus`` (default: the embedded corpus)."""
    c = config
    layers = [b.layer for b in view.blocks]
    if c.method == "top-k":
        k = max(b.top_k for b in view.blocks)
        if c.k > k:
            raise MoelabError(f"top-k: --k {c.k} is more than the model's top_k={k}")
        edit = CountEdit(mode="top-k", values=dict.fromkeys(layers, c.k))
    elif c.method == "top-p":
        edit = CountEdit(mode="top-p", values=dict.fromkeys(layers, float(c.p)), cap=c.cap)
    elif c.method == "odp" and c.beta is not None:
        edit = CountEdit(mode="odp", values=dict.fromkeys(layers, float(c.beta)))
    else:
        edit = _calibrated(view, c, corpus, progress)
    check_count_fits(edit, view, c.method)
    return edit


def _calibrated(view: Any, c: DyncountConfig, corpus: str | os.PathLike | None, progress: bool) -> CountEdit:
    from moelab.compress.calib import calibration_batches
    from moelab.data import default_corpus
    from moelab.steer.mcmoe import calibrate_odp
    from moelab.steer.topany import TopAnyConfig, TopAnyGates, train_top_any
    from moelab.trace.progress import token_progress

    source = Path(corpus) if corpus is not None else default_corpus()
    calib = calibration_batches(view, source, tokens=c.tokens, seq_len=c.seq_len, batch_size=4, seed=c.seed)
    if c.method == "odp":
        cal = calibrate_odp(view, calib.batches, target_active=c.target, protect=c.protect)
        return CountEdit(mode="odp", values=cal.beta,
                         tau={k: None if math.isinf(v) else v for k, v in cal.tau.items()})
    start = calibrate_odp(view, calib.batches, target_active=c.target, protect=0).beta
    gates = TopAnyGates(view).start_from_thresholds(start)
    cfg = TopAnyConfig(target_active=c.target, steps=c.steps, lr=0.01, seed=c.seed)
    with token_progress(c.steps, enabled=progress, label="top-any gates (steps)") as advance:
        gates, _ = train_top_any(view, calib.batches, cfg, gates=gates, on_step=lambda *_: advance(1))
    return CountEdit(mode="top-any", module=gates)


__all__ = ["COUNT_MODES", "CountEdit", "DyncountConfig", "check_count_fits", "count_edit_from_dict",
           "dyncount_edit", "gates_module", "install_count_edit", "write_gates"]
