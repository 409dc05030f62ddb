"""RTN and GPTQ (moelab.compress.quant) against slow obvious references, on random weights and inputs."""

from __future__ import annotations

import pytest
import torch

from moelab.compress.quant import (
    QuantConfig,
    gptq_quantize,
    gptq_reference,
    hessian_error,
    rtn_quantize,
)
from moelab.errors import MoelabError

CONFIGS = [QuantConfig(b, g, s) for b in (2, 3, 4, 8) for g in (8, None) for s in (True, False)]


def _rtn_element(w: float, lo: float, hi: float, cfg: QuantConfig) -> tuple[int, float]:
    """One element by the formulas, in Python floats: (q, dequantised)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = cfg.qmax - cfg.qmin
    if cfg.symmetric:
        s, z = max(-lo, hi) / (span / 2), 0
    else:
        s = (hi - lo) / span
    if s == 0:
        s = torch.finfo(torch.float64).eps
    if not cfg.symmetric:
        z = min(max(round(cfg.qmin - lo / s), cfg.qmin), cfg.qmax)
    q = min(max(round(w / s) + z, cfg.qmin), cfg.qmax)
    return q, (q - z) * s


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_rtn_matches_per_element_reference(cfg):
    gen = torch.Generator().manual_seed(cfg.bits)
    w = torch.randn(3, 4, 16, generator=gen, dtype=torch.float64)
    w[0, 0, :8] = 0.0  # an all-zero group
    qt = rtn_quantize(w, cfg)
    g = 16 if cfg.group_size is None else cfg.group_size
    deq = qt.dequantize()
    for e in range(3):
        for o in range(4):
            for i in range(16):
                grp = w[e, o, (i // g) * g:(i // g + 1) * g]
                q, d = _rtn_element(float(w[e, o, i]), float(grp.min()), float(grp.max()), cfg)
                assert int(qt.q[e, o, i]) == q
                assert abs(float(deq[e, o, i]) - d) <= 1e-12
    # every element within half a step of its group's scale, and on the integer grid
    step = qt.scale.repeat_interleave(g, -1)
    assert bool(((w - deq).abs() <= step / 2 * (1 + 1e-9)).all())
    assert int(qt.q.min()) >= cfg.qmin and int(qt.q.max()) <= cfg.qmax


def test_rtn_int8_error_is_small_and_float32_scales_keep_dtype():
    w = torch.randn(2, 8, 64)
    qt = rtn_quantize(w, QuantConfig(8, 32))
    assert qt.scale.dtype == torch.float32 and qt.q.dtype == torch.int8
    step = qt.scale.repeat_interleave(32, -1)
    # half a step per element, plus float32 rounding of w - w' (a few ulp of |w|) at the clamp edge
    assert bool(((w - qt.dequantize()).abs() <= step / 2 + 1e-6 * w.abs()).all())


def _hessian(n: int, i: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, i, generator=gen, dtype=torch.float64) @ torch.randn(i, i, generator=gen, dtype=torch.float64)
    return 2 * x.T @ x


@pytest.mark.parametrize("cfg", [QuantConfig(4, 8), QuantConfig(3, 16, False), QuantConfig(2, None),
                                 QuantConfig(8, 4, False)], ids=lambda c: c.describe())
def test_gptq_blocked_matches_column_by_column_reference(cfg):
    gen = torch.Generator().manual_seed(1)
    E, O, I = 3, 5, 32  # noqa: E741
    w = torch.randn(E, O, I, generator=gen, dtype=torch.float64)
    H = torch.stack([_hessian(64, I, gen) for _ in range(E)])
    H[1, 3, :] = 0  # a dead input of expert 1
    H[1, :, 3] = 0
    fast = gptq_quantize(w, H, cfg, block=8)  # several lazy blocks
    ties = 0
    for e in range(E):
        ref, x = gptq_reference(w[e], H[e], cfg)
        for o in range(O):
            diff = (fast.q[e, o] != ref.q[o]).nonzero()
            if len(diff) == 0:
                torch.testing.assert_close(fast.scale[e, o], ref.scale[o], rtol=1e-9, atol=1e-12)
                continue
            # the rows agree up to their first difference, and it lies on a rounding tie (k + 1/2): the
            # symmetric scale puts a group's extreme there, and the two summation orders break it apart
            c = int(diff[0])
            assert abs(abs(float(x[o, c]) % 1) - 0.5) < 1e-9, (e, o, c, float(x[o, c]))
            assert cfg.symmetric
            ties += 1
    assert ties <= E * O // 3
    assert bool((fast.dequantize()[1, :, 3] == 0).all())


def test_gptq_beats_rtn_on_the_loss_it_minimises():
    gen = torch.Generator().manual_seed(2)
    E, O, I = 4, 16, 64  # noqa: E741
    w = torch.randn(E, O, I, generator=gen)
    H = torch.stack([_hessian(256, I, gen) for _ in range(E)]).float()
    cfg = QuantConfig(3, 16)
    g_err = hessian_error(w, gptq_quantize(w, H, cfg), H)
    r_err = hessian_error(w, rtn_quantize(w, cfg), H)
    assert bool((g_err < r_err).all()), (g_err, r_err)


def test_gptq_float32_matches_float64_and_single_matrix():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 32, generator=gen, dtype=torch.float64)
    H = _hessian(100, 32, gen)
    cfg = QuantConfig(4, 16)
    one = gptq_quantize(w, H, cfg)
    assert one.q.shape == (6, 32)
    f32 = gptq_quantize(w.float(), H, cfg)
    # float32 arithmetic may flip a code that lies on a rounding boundary; the weights stay close
    assert float((one.q != f32.q).float().mean()) < 0.02
    torch.testing.assert_close(f32.dequantize().double(), one.dequantize(), atol=float(one.scale.max()) * 1.01,
                               rtol=0)


def test_bad_settings_are_named():
    with pytest.raises(MoelabError, match="bits: 5"):
        QuantConfig(5)
    with pytest.raises(MoelabError, match="group_size: 48 does not divide the input dimension 64"):
        rtn_quantize(torch.randn(2, 64), QuantConfig(4, 48))
    with pytest.raises(MoelabError, match="Hessian"):
        gptq_quantize(torch.randn(2, 4, 8), torch.eye(4).expand(2, 4, 4), QuantConfig(4, 8))
