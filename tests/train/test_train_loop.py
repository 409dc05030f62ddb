"""``moelab train`` on a tiny config: resume equivalence, refusal, atomic checkpoints, log and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from moelab.cli import main
from moelab.errors import CheckpointError, MoelabError
from moelab.train import checkpoint as ckpt_mod
from moelab.train.config import make_config
from moelab.train.log import read_log
from moelab.train.loop import lr_at, train


def _cfg(corpus, **kw):
    return make_config("tiny", corpus=corpus, **kw)


def test_resume_gives_the_same_losses_and_weights(tiny_corpus, tmp_path):
    cfg = _cfg(tiny_corpus, steps=8)
    straight = train(cfg, tmp_path / "a", progress=False)
    first = train(cfg, tmp_path / "b", stop_at=4, progress=False)
    assert first.state.step == 4 and first.resumed_from == 0
    second = train(cfg, tmp_path / "b", progress=False)
    assert second.resumed_from == 4 and second.state.step == 8
    assert straight.state.tokens == second.state.tokens == 8 * cfg.tokens_per_step
    # NOTE: same ops on the same single thread; tolerance only allows for float summation order.
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(straight.losses),
                               rtol=1e-6, atol=1e-6)
    wa = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    # a stop request (SIGINT/SIGTERM in the CLI) between steps: checkpoint, then resume to the same losses
    polls = iter([False, False, False, True])
    stopped = train(cfg, tmp_path / "c", progress=False, should_stop=lambda: next(polls))
    assert stopped.interrupted and stopped.state.step == 3
    assert json.loads((tmp_path / "c" / "checkpoint" / "state.json").read_text())["step"] == 3
    rest = train(cfg, tmp_path / "c", progress=False)
    assert not rest.interrupted and rest.resumed_from == 3
    torch.testing.assert_close(torch.tensor(stopped.losses + rest.losses), torch.tensor(straight.losses),
                               rtol=1e-6, atol=1e-6)
    # the log of the resumed run has every step once, and matches the straight run's
    steps = [r["step"] for r in read_log(tmp_path / "b") if r["kind"] == "train"]
    assert steps == list(range(1, 9))
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000
    losses_a = [r["loss"] for r in read_log(tmp_path / "a") if r["kind"] == "train"]
    losses_b = [r["loss"] for r in read_log(tmp_path / "b") if r["kind"] == "train"]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)


def test_training_reduces_loss_and_logs_router_losses(tiny_corpus, tmp_path):
    res = train(_cfg(tiny_corpus, steps=30, lr=1e-2, warmup_steps=3), tmp_path, progress=False)
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5 - 0.5
    rec = [r for r in read_log(tmp_path) if r["kind"] == "train"][-1]
    assert rec["balance"] >= 1.0 - 1e-4 and rec["z"] > 0 and rec["tok_s"] > 0
    assert 0 <= rec["load_min"] <= 1 / 4 <= rec["load_max"] <= 1


def test_refuses_to_resume_into_another_configs_checkpoint(tiny_corpus, tmp_path):
    train(_cfg(tiny_corpus, steps=2), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"refusing to resume .*lr: checkpoint 0.003 vs now 0.01"):
        train(_cfg(tiny_corpus, steps=2, lr=0.01), tmp_path, progress=False)
    # a run-only setting (threads, checkpoint period) may change on resume
    assert train(_cfg(tiny_corpus, steps=2, checkpoint_every_s=5.0), tmp_path, progress=False).resumed_from == 2
    res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--corpus", str(tiny_corpus), "--out", str(tmp_path),
                                    "--steps", "2", "--hidden-size", "64", "--no-progress"])
    assert res.exit_code == 2 and "error: refusing to resume" in res.output and "hidden_size" in res.output


def test_refuses_a_checkpoint_folder_of_something_else(tiny_corpus, tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="missing optimizer.pt, rng.safetensors, state.json"):
        train(_cfg(tiny_corpus), tmp_path, progress=False)


def test_interrupted_save_keeps_the_previous_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    cfg = _cfg(tiny_corpus, steps=4)
    train(cfg, tmp_path, stop_at=2, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}

    def disk_full(model, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"half a tensor")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg, tmp_path, progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint").iterdir()}
    assert after == before
    assert json.loads(after["state.json"])["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    monkeypatch.undo()
    assert train(cfg, tmp_path, progress=False).resumed_from == 2


def test_corpus_folder_with_no_text(tiny_corpus, tmp_path):
    with pytest.raises(MoelabError, match="manifest.json not found"):
        train(_cfg(tmp_path / "nothing"), tmp_path / "run", progress=False)
    res = CliRunner().invoke(main, ["train", "--preset", "tiny", "--corpus", str(tmp_path), "--out",
                                    str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 2 and "error: corpus:" in res.output


def test_lr_schedule_warmup_then_cosine(tiny_corpus):
    cfg = _cfg(tiny_corpus, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    lrs = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 30, "not divisible by num_heads"),
    ("top_k", 9, "exceeds num_experts"),
    ("steps", 0, "steps: expected a positive integer"),
    ("domain_weights", {"poetry": 1.0}, "domain_weights"),
    ("aux_coef", -1.0, "aux_coef"),
])
def test_config_validation(tiny_corpus, field, value, match):
    with pytest.raises(MoelabError, match=match):
        make_config("default", corpus=tiny_corpus, **{field: value})
    with pytest.raises(MoelabError, match="unknown field"):
        make_config("default", corpus=tiny_corpus, hiden_size=3)
