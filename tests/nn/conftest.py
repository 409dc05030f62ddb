"""Helpers shared by the tests of moelab.nn."""

from __future__ import annotations

import torch

from moelab.nn import Experts, ExpertsConfig

F64 = torch.float64


def make(E=5, H=6, I=4, act="swiglu", bias=False, dtype=F64, seed=0):
    torch.manual_seed(seed)
    ex = Experts(
        ExpertsConfig(num_experts=E, hidden_size=H, inner_size=I, activation=act, bias=bias),
        dtype=dtype,
    )
    if bias:
        with torch.no_grad():
            for b in (ex.gate_bias, ex.up_bias, ex.down_bias):
                if b is not None:
                    b.normal_()
    return ex
