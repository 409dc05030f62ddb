"""moelab.run: the runner keeps its promises (eval mode, no grad, hooks gone, state restored, also on
error) and the one next-token loss equals a per-position loop."""

import math

import pytest
import torch

from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.run import evaluating, next_token_nll, run_batches


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("training", [True, False])
def test_run_batches_eval_mode_no_grad_and_restores(training):
    model = tiny_model("Qwen3-MoE")
    model.train(training)
    seen = []

    def on_output(ids_BS, out):
        seen.append((model.training, torch.is_grad_enabled(), out.logits.requires_grad, ids_BS.shape))

    batches = [torch.randint(0, 32, (2, 5)), torch.randint(0, 32, (1, 3))]
    run_batches(model, batches, on_output=on_output, use_cache=False)
    assert seen == [(False, False, False, (2, 5)), (False, False, False, (1, 3))]
    assert model.training is training and torch.is_grad_enabled()
    assert all(m.training is training for m in model.modules())


@pytest.mark.parametrize("training", [True, False])
def test_hooks_removed_and_state_restored_on_error(training):
    view = open_model(tiny_model("Mixtral"))
    view.model.train(training)
    events = []
    handles = [b.register_routing_hook(events.append) for b in view.blocks]

    def fail(_ids, _out):
        raise _Boom

    with pytest.raises(_Boom):
        run_batches(view.model, [torch.randint(0, 32, (1, 4))], handles=handles, on_output=fail)
    assert len(events) == len(view.blocks)  # the hooks ran once, then were removed
    view.model(input_ids=torch.randint(0, 32, (1, 4)))
    assert len(events) == len(view.blocks)
    assert view.model.training is training


def test_evaluating_removes_torch_hooks_on_error():
    model = torch.nn.Linear(2, 2).train()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(_Boom), evaluating(model, [handle]):
        assert not model.training and not torch.is_grad_enabled()
        model(torch.zeros(1, 2))
        raise _Boom
    model(torch.zeros(1, 2))
    assert calls == [1] and model.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_nll_equals_position_loop(dtype):
    torch.manual_seed(0)
    logits_BSV = torch.randn(3, 6, 11, dtype=torch.float64).to(dtype)
    ids_BS = torch.randint(0, 11, (3, 6))
    total, n = 0.0, 0
    for b in range(3):
        for s in range(5):
            logp = torch.log_softmax(logits_BSV[b, s].double(), -1)
            total -= float(logp[ids_BS[b, s + 1]])
            n += 1
    tol = 1e-5 * n
    assert float(next_token_nll(logits_BSV, ids_BS, reduction="sum")) == pytest.approx(total, abs=tol)
    assert float(next_token_nll(logits_BSV, ids_BS)) == pytest.approx(total / n, abs=1e-5)
    assert next_token_nll(logits_BSV, ids_BS).dtype == torch.float32
    f64 = next_token_nll(logits_BSV, ids_BS, dtype=torch.float64)
    assert f64.dtype == torch.float64 and math.isclose(float(f64), total / n, rel_tol=1e-12)
