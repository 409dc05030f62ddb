"""A native one-token experts kernel: decode on the CPU, where the experts are memory bound.

For one token ``x`` routed to ``K`` experts ``e_k`` with weights ``w_k``:

    y = sum_k w_k * (down_{e_k} act(gate_{e_k} x + bg_{e_k}, up_{e_k} x + bu_{e_k}) + bd_{e_k})

Shape legend: K slots (active experts), H hidden, I expert inner dim, E experts.

Why: ``torch.mv`` per slice forks and joins the thread pool 3K times per layer and each join waits
for the slowest thread; here the gate and up rows of all K experts are read in one OpenMP
parallel region and the down rows in another, each thread owning one block of rows
(``_one_token.c``). Measured in bench/moe_layer.py and bench/decode_gemv.py.

The kernel is plain C (no Python or torch headers) built on first use with the system C
compiler (``$CC``, else ``cc``; well under a second) into ``$MOELAB_CACHE_DIR`` (default
``$XDG_CACHE_HOME/moelab``, else ``~/.cache/moelab``) under a name hashed from the source, the flags and the CPU, written to a
temporary name and renamed, and loaded with ``ctypes`` into the OpenMP runtime torch already
loaded. Where there is no compiler, the build fails, or ``MOELAB_NATIVE=0``, :func:`library`
is None and callers keep their ``torch.mv`` path: the same sums, rounded differently.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_one_token.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_LIBS = ["-lm"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_log = logging.getLogger(__name__)


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags where Linux states them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def _build(compiler: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE), *_LIBS], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, L, N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for sfx in _SUFFIX.values():
        getattr(lib, f"moelab_in_proj_{sfx}").argtypes = [P, P, L, L, P, L, L, L, P, P, P, N]
        getattr(lib, f"moelab_out_proj_{sfx}").argtypes = [P, L, L, P, L, L, L, P, P, N]
        fn = getattr(lib, f"moelab_swiglu_{sfx}")
        fn.argtypes, fn.restype = [P, P, L, L, P, L, L, P, P, L, L, L, P, P, N], ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (``MOELAB_NATIVE=0``, no C compiler, or a failed build, logged)."""
    if os.environ.get("MOELAB_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _log.info("moelab.nn: no C compiler found; one-token experts run on torch.mv")
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([compiler, *_FLAGS, *_LIBS]).encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("MOELAB_CACHE_DIR")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moelab")
    out = cache / "native" / f"one_token-{key}.so"
    try:
        if not out.exists():
            _build(compiler, out)
        return _declare(ctypes.CDLL(str(out)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        _log.warning("moelab.nn: could not build the one-token kernel (%s); using torch.mv", detail)
        return None


def one_token(x_TH: Tensor, rows_K: list[int], w_K: list[float], gate, up, down, b_gate, b_up,
              b_down, act) -> Tensor | None:
    """``y`` ``[1, H]`` of one token ``x_TH`` ``[1, H]`` through the weight rows ``rows_K`` (the
    experts, or an offloading cache's slots) with combine weights ``w_K``, summed in the order
    given; weights ``[E, out, in]``, biases ``[E, out]`` or None. None where the kernel cannot run
    these: not built, not the CPU, not float32 or float64 throughout, rows not contiguous, or gate
    and up with different strides. SwiGLU without biases (``act.native == "swiglu"``) is one C
    call; other activations and biases run in torch between the two projections.

    NOTE: few attribute reads and torch ops: at decode this code's data is cold (other layers ran
    since) and each costs ~10 us (bench/moe_layer.py's flushed runs)."""
    lib, dt = library(), x_TH.dtype
    sfx = _SUFFIX.get(dt)
    s_up, s_down = up.stride(), down.stride()
    if (lib is None or sfx is None or x_TH.device.type != "cpu" or up.dtype != dt or down.dtype != dt
            or s_up[2] != 1 or s_down[2] != 1 or not x_TH.is_contiguous()
            or (gate is not None and (gate.dtype != dt or gate.stride() != s_up))):
        return None
    K, (_, I, H) = len(rows_K), up.shape
    n = torch.get_num_threads()
    ids = (ctypes.c_int64 * K)(*rows_K)
    y_TH = x_TH.new_empty(1, H)
    if getattr(act, "native", None) == "swiglu" and gate is not None and b_gate is b_up is b_down is None:
        w = ((ctypes.c_float if sfx == "f32" else ctypes.c_double) * K)(*w_K)
        if getattr(lib, f"moelab_swiglu_{sfx}")(
                gate.data_ptr(), up.data_ptr(), s_up[0], s_up[1], down.data_ptr(), s_down[0],
                s_down[1], ids, w, K, H, I, x_TH.data_ptr(), y_TH.data_ptr(), n):
            raise MemoryError(f"moelab.nn: one-token kernel: no memory for its {K}x{I} scratch")
        return y_TH
    h0, h1 = x_TH.new_empty(2, K, I).unbind()
    # gated: gate -> h0, up -> h1; ungated: up, the only input projection, -> h0
    h_gate, h_up = (h0, h1) if gate is not None else (None, h0)
    getattr(lib, f"moelab_in_proj_{sfx}")(
        (up if gate is None else gate).data_ptr(), None if gate is None else up.data_ptr(),
        s_up[0], s_up[1], ids, K, I, H, x_TH.data_ptr(), h0.data_ptr(), h1.data_ptr(), n)
    w_K1 = torch.tensor(w_K, dtype=dt).unsqueeze(1)
    idx = torch.tensor(rows_K)
    if b_up is not None:
        h_up.add_(b_up.index_select(0, idx))
    if b_gate is not None:
        h_gate.add_(b_gate.index_select(0, idx))
    a_KI = (act(h_gate, h_up) if h_gate is not None else act(h_up)).mul_(w_K1).contiguous()
    getattr(lib, f"moelab_out_proj_{sfx}")(down.data_ptr(), s_down[0], s_down[1], ids, K, H, I,
                                           a_KI.data_ptr(), y_TH.data_ptr(), n)
    if b_down is not None:
        y_TH[0].addmv_(b_down.index_select(0, idx).t(), w_K1[:, 0])
    return y_TH
