"""Predictor files: save and load give the same predictions; a file for another model or a corrupt
file fails when opened, naming the file; ``moelab offload train-predictor`` and ``generate
--policy predictive --predictor``."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from moelab.cli import main
from moelab.compress.calib import Calibration
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model
from moelab.offload.predictor import PredictorConfig, cache_hint, collect_routes, train_predictor
from moelab.offload.predictor_file import PredictorFileError, load_predictor, save_predictor


def _trained(view, hidden: int):
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    calib = Calibration(list(ids.split(2)), [None] * 4, ids.numel(), 0)
    cfg = PredictorConfig(horizon=2, next_token=True, tokens_ahead=2, hint="scores", hidden=hidden, steps=20)
    return train_predictor(collect_routes(view, calib), cfg)


@pytest.mark.parametrize("hidden", [0, 16])
def test_saved_predictor_predicts_the_same(tiny_dirs, tmp_path, hidden):
    view = open_model(tiny_dirs["Qwen3-MoE"])
    predictor = _trained(view, hidden)
    path = save_predictor(predictor, tmp_path / "p.safetensors", view)
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, renamed
    back = load_predictor(path, view)
    assert back.pairs == predictor.pairs and back.top_k == predictor.top_k and back.config == predictor.config
    x_TH = torch.randn(3, view.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for src in {p[0] for p in predictor.pairs}:
        for target in predictor.targets(src):
            assert torch.equal(back.logits(src, x_TH, target), predictor.logits(src, x_TH, target))
        assert cache_hint(back, src, x_TH) == cache_hint(predictor, src, x_TH)
    # the offloaded view of the same checkpoint has the same fingerprint: the file loads there too
    _, experts = offload_model(tiny_dirs["Qwen3-MoE"], budget=1.0, policy="predictive", predictor=path)
    experts.close()


def test_predictor_file_errors(tiny_dirs, tmp_path):
    view = open_model(tiny_dirs["Qwen3-MoE"])
    path = save_predictor(_trained(view, 0), tmp_path / "p.safetensors", view)
    with pytest.raises(PredictorFileError, match=r"p\.safetensors was trained on another model: .*architecture"):
        load_predictor(path, open_model(tiny_dirs["Mixtral"]))
    with pytest.raises(PredictorFileError, match="does not exist"):
        load_predictor(tmp_path / "none.safetensors", view)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PredictorFileError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_predictor(cut, view)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other), metadata={"format": "something"})
    with pytest.raises(PredictorFileError, match="'format' must be 'moelab.predictor'"):
        load_predictor(other, view)
    with pytest.raises(MoelabError, match="model= is required"):
        save_predictor(_trained(view, 0), tmp_path / "q.safetensors")


def test_train_predictor_and_generate_with_it(tmp_path):
    from moelab.data import default_model

    out = tmp_path / "pred.safetensors"
    res = CliRunner().invoke(main, ["offload", "train-predictor", "--out", str(out), "--tokens", "512",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    predictor = load_predictor(out, open_model(default_model()))
    assert predictor.config.hint == "scores" and predictor.config.tokens_ahead == 4
    _, probe = offload_model(default_model(), budget=1.0)
    budget = str(2 * min_budget_bytes(probe.store, probe.view))
    probe.close()
    gen = ["generate", "--prompt", "def f(x):", "--max-new-tokens", "6", "--expert-budget", budget]
    plain = CliRunner().invoke(main, gen)
    steered = CliRunner().invoke(main, [*gen, "--policy", "predictive", "--predictor", str(out), "--stats"])
    assert plain.exit_code == 0 and steered.exit_code == 0, steered.output
    assert steered.output.startswith(plain.output.rstrip("\n"))  # the cache policy never changes the text
    assert "hit rate" in steered.output
    missing = CliRunner().invoke(main, [*gen, "--policy", "predictive"])
    assert missing.exit_code == 2 and "--policy predictive needs --predictor FILE" in missing.output
    stray = CliRunner().invoke(main, [*gen, "--predictor", str(out)])
    assert stray.exit_code == 2 and "--predictor is used by --policy predictive only" in stray.output
    bench = CliRunner().invoke(main, ["offload", "bench", "--policy", "predictive", "--predictor", str(out),
                                      "--tokens", "4", "--budget", budget, "--no-progress"])
    assert bench.exit_code == 0 and "hit rate" in bench.output, bench.output
