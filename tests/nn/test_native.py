"""The native one-token kernel (moelab.nn._native) against the per-slot reference and the torch.mv
path; its fallbacks. Tolerances: float64 rtol = atol = 1e-10, float32 1e-5 (sums of <= 64 products
of unit-scale values, reduced in another order than the reference)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from moelab.nn import _native

from .conftest import F64
from .conftest import make as make_experts

TOL = {F64: 1e-10, torch.float32: 1e-5}
HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture
def cc():
    """The tests of the kernel itself: skipped without a C compiler, failed under CI (which
    installs one, see .ci/run)."""
    if not HAVE_CC:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no C compiler (cc or gcc) is installed (.ci/run installs gcc)")
        pytest.skip("no C compiler: the kernel cannot be built here")
    if os.environ.get("MOELAB_NATIVE") == "0":
        pytest.skip("MOELAB_NATIVE=0: the kernel is switched off")


def make(E=9, H=40, I=24, **kw):
    return make_experts(E=E, H=H, I=I, **kw)


def token(ex, K=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    dt, H, E = ex.up.dtype, ex.up.shape[2], ex.up.shape[0]
    x = torch.randn(1, H, dtype=dt, generator=g)
    return x, torch.randperm(E, generator=g)[:K][None], torch.rand(1, K, dtype=dt, generator=g)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """library() rebuilt under a temporary cache dir, and its cache cleared again after."""
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path))
    _native.library.cache_clear()
    yield tmp_path
    _native.library.cache_clear()


def test_builds_where_a_compiler_is(cc, fresh_library):
    """A machine with a C compiler gets the kernel: one library under the cache dir, no temporary
    file left; a second call loads the same object."""
    assert _native.library() is not None
    files = sorted(p.name for p in (fresh_library / "native").iterdir())
    assert len(files) == 1 and files[0].startswith("one_token-") and files[0].endswith(".so"), files
    assert _native.library() is _native.library()


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("act", ["swiglu", "geglu", "reglu", "gelu", "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_one_token_call_equals_reference_and_mv_path(cc, monkeypatch, dtype, act, bias):
    """Experts' one-token call on the kernel equals the per-slot reference (``TOL``) and the torch.mv
    path (kernel off) to the same tolerance, for gated and plain activations, with biases."""
    ex = make(act=act, bias=bias, dtype=dtype)
    with torch.no_grad():
        for seed in range(4):
            x, ids, w = token(ex, seed=seed)
            got = ex(x, ids, w)
            ref = ex.reference(x, ids, w)
            torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])
            with monkeypatch.context() as m:
                m.setattr(_native, "library", lambda: None)
                mv = ex(x, ids, w)
            torch.testing.assert_close(got, mv, rtol=TOL[dtype], atol=TOL[dtype])


def test_the_kernel_runs_where_it_should(cc):
    """The Experts call really takes the kernel for float32/float64 (not silently the mv path):
    ``one_token`` returns a tensor for them, None for bfloat16, for rows that are not contiguous,
    for gate and up with different strides and for a non-contiguous token."""
    ex = make(dtype=torch.float32)
    x, ids, w = token(ex)
    W = ex._weights()
    rows, w_K = sorted(ids[0].tolist()), w[0].tolist()
    assert _native.one_token(x, rows, w_K, *W, ex.act) is not None
    g, u, d = W[:3]
    H, I = x.shape[1], u.shape[1]

    def cols(t):  # the same values, rows not contiguous (stride 1 along the output dim)
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    bad = [
        (x.bfloat16(), g.bfloat16(), u.bfloat16(), d.bfloat16()),
        (x, cols(g), cols(u), d),
        (x, g, u, cols(d)),
        (x, torch.cat([g, g], 1)[:, :I], u, d),  # gate strides differ from up's
        (torch.randn(H, 2)[:, 0][None], g, u, d),  # token not contiguous
    ]
    for xb, gb, ub, db in bad:
        assert _native.one_token(xb, rows, w_K, gb, ub, db, None, None, None, ex.act) is None


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_strided_views_and_slot_rows(cc, dtype):
    """The kernel on transformers' layout (gate and up the halves of one fused ``[E, 2I, H]``
    tensor: expert stride 2IH) and on an offloading cache's rows (expert e at row slot[e] of a
    larger buffer) equals the reference; repeated rows are summed like distinct ones."""
    ex = make(dtype=dtype, seed=3)
    E, I = ex.up.shape[0], ex.up.shape[1]
    x, ids, w = token(ex, K=5, seed=4)
    ref = ex.reference(x, ids, w)
    g, u, d = (p.detach() for p in ex._weights()[:3])
    fused = torch.cat([g, u], 1)
    gate, up = fused[:, :I], fused[:, I:]
    assert gate.stride() == up.stride() == (2 * I * gate.shape[2], gate.shape[2], 1)
    rows, w_K = ids[0].tolist(), w[0].tolist()
    got = _native.one_token(x, rows, w_K, gate, up, d, None, None, None, ex.act)
    torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])
    slot = torch.randperm(E + 4, generator=torch.Generator().manual_seed(5))[:E]
    bufs = [torch.randn(E + 4, *p.shape[1:], dtype=dtype) for p in (g, u, d)]
    for b, p in zip(bufs, (g, u, d), strict=True):
        b[slot] = p
    got = _native.one_token(x, [int(slot[e]) for e in rows], w_K, *bufs, None, None, None, ex.act)
    torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])
    twice = _native.one_token(x, rows[:1] * 2, [0.25, 0.75], g, u, d, None, None, None, ex.act)
    once = ex.reference(x, ids[:, :1], torch.ones(1, 1, dtype=dtype))
    torch.testing.assert_close(twice, once, rtol=TOL[dtype], atol=TOL[dtype])


def test_result_does_not_depend_on_the_thread_count(cc):
    """Each output is one thread's sum in a fixed order: 1, 2 and 3 threads agree bit for bit."""
    ex = make(E=16, H=96, I=40, dtype=torch.float32)
    x, ids, w = token(ex, K=6)
    before = torch.get_num_threads()
    outs = []
    try:
        with torch.no_grad():
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(ex(x, ids, w))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_no_compiler_or_switched_off_falls_back(fresh_library, monkeypatch, caplog):
    """MOELAB_NATIVE=0 or a compiler that fails: library() is None (the failure logged as a
    warning) and the Experts call still equals the reference on the torch.mv path."""
    monkeypatch.setenv("MOELAB_NATIVE", "0")
    assert _native.library() is None
    _native.library.cache_clear()
    monkeypatch.setenv("MOELAB_NATIVE", "1")
    monkeypatch.setenv("CC", "false")  # exits 1: a failed build
    with caplog.at_level(logging.WARNING, logger="moelab.nn._native"):
        assert _native.library() is None
    assert "could not build the one-token kernel" in caplog.text
    assert not list((fresh_library / "native").glob("*")), "a failed build leaves no file"
    ex = make()
    x, ids, w = token(ex)
    with torch.no_grad():
        torch.testing.assert_close(ex(x, ids, w), ex.reference(x, ids, w), rtol=1e-10, atol=1e-10)
