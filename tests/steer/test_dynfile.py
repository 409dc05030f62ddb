"""Dynamic expert-count steering files: each mode's file applied equals the edit it names, bad files
are named errors, and ``moelab steer dyncount`` -> ``generate`` / ``eval --steer`` end to end on
the shipped model with a few tokens."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from moelab.cli import main
from moelab.data import default_model
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.steer import CountEdit, SteeringFileError, apply_steering, load_steering, write_steering
from moelab.steer.dyncount import fixed_top_k
from moelab.steer.dynfile import write_gates
from moelab.steer.mcmoe import ODPCalibration, online_dynamic_pruning
from moelab.steer.topany import TopAnyGates, top_any
from moelab.steer.topp import top_p


@pytest.fixture(scope="module")
def view():
    return open_model(tiny_model("Qwen3-MoE", num_experts_per_tok=3))


def _logits(view, install=None):
    ids = torch.randint(0, view.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        handle = install() if install is not None else None
        out = view.model(ids).logits
        if handle is not None:
            handle.remove()
    return out


def _gates(view):
    gates = TopAnyGates(view)
    with torch.no_grad():
        for p in gates.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return gates.eval()


def _cases(view):
    layers = [b.layer for b in view.blocks]
    beta, tau = dict.fromkeys(layers, 0.999), dict.fromkeys(layers, 1e9)
    gates = _gates(view)
    return [
        (CountEdit(mode="top-k", values=dict.fromkeys(layers, 2)), lambda: fixed_top_k(view, 2)),
        (CountEdit(mode="top-p", values=dict.fromkeys(layers, 0.05)), lambda: top_p(view, 0.05)),
        (CountEdit(mode="odp", values=beta, tau=tau),
         lambda: online_dynamic_pruning(view, ODPCalibration(beta, tau))),
        (CountEdit(mode="top-any", module=gates), lambda: top_any(view, gates)),
    ]


def test_each_mode_round_trips_and_equals_its_edit(view, tmp_path):
    plain = _logits(view)
    for i, (edit, direct) in enumerate(_cases(view)):
        path = tmp_path / f"s{i}.json"
        write_steering(path, view, edit)
        spec = load_steering(path, view)
        got = _logits(view, lambda spec=spec: apply_steering(view, spec))
        want = _logits(view, direct)
        assert torch.equal(got, want), edit.mode
        assert not torch.equal(got, plain), f"{edit.mode} changed nothing"
    assert (tmp_path / "s3.gates.safetensors").is_file()
    assert torch.equal(_logits(view), plain), "the handles were removed"


def test_no_op_settings_are_the_identity(view, tmp_path):
    k = view.blocks[0].top_k
    layers = [b.layer for b in view.blocks]
    for edit in (CountEdit(mode="top-k", values=dict.fromkeys(layers, k)),
                 CountEdit(mode="top-p", values=dict.fromkeys(layers, 1.0)),
                 CountEdit(mode="odp", values=dict.fromkeys(layers, 0.0))):
        path = tmp_path / f"{edit.mode}.json"
        write_steering(path, view, edit)
        assert torch.equal(_logits(view, lambda p=path: apply_steering(view, load_steering(p, view)))
                           , _logits(view)), edit.mode


def test_bad_files_are_named(view, tmp_path):
    layers = [b.layer for b in view.blocks]
    path = tmp_path / "s.json"
    write_steering(path, view, CountEdit(mode="odp", values=dict.fromkeys(layers, 0.3)))
    doc = json.loads(path.read_text())

    def bad(change, match):
        d = json.loads(json.dumps(doc))
        change(d["edits"][0])
        p = tmp_path / "bad.json"
        p.write_text(json.dumps(d))
        with pytest.raises(SteeringFileError, match=match) as err:
            load_steering(p, view)
        assert str(p) in str(err.value)

    bad(lambda e: e["values"].update({"1": 1.5}), r"odp: layer 1: beta must lie in \[0, 1\], got 1.5")
    bad(lambda e: e.update(mode="top-k", values={"1": 9}), "top-k: layer 1: k=9 but the layer routes to top_k=3")
    bad(lambda e: e.update(values={"7": 0.2}, tau={}), "layer 7 is not an MoE layer")
    bad(lambda e: e.update(speed=1), r"unknown field\(s\) \['speed'\]")
    bad(lambda e: e.update(mode="top-any", gates="none.safetensors", values={}), "gates file .* does not exist")
    gated = tmp_path / "g.json"
    write_steering(gated, view, CountEdit(mode="top-any", module=_gates(view)))
    other = open_model(tiny_model("Qwen3-MoE", num_experts=6))
    with pytest.raises(SteeringFileError, match="another model"):
        load_steering(gated, other)
    write_gates(CountEdit(mode="top-any", module=_gates(other)), gated)  # the same name, other shapes
    with pytest.raises(SteeringFileError, match="the gates file g.gates.safetensors was made for another model"):
        load_steering(gated, view)
    with pytest.raises(MoelabError, match=r"top-p: layer 0: p must lie in \(0, 1\]"):
        CountEdit(mode="top-p", values={0: 0})


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_dyncount_to_generate_and_eval(tmp_path):
    p_file, odp_file, any_file = tmp_path / "p.json", tmp_path / "o.json", tmp_path / "a.json"
    res = _run("steer", "dyncount", "--method", "top-p", "--p", 0.5, "--out", p_file)
    assert res.exit_code == 0 and "top-p (p per layer 1: 0.5" in res.output, res.output
    res = _run("generate", "--prompt", "def f(x):", "--max-new-tokens", 4, "--steer", p_file)
    assert res.exit_code == 0, res.output
    calib = ("--tokens", 512, "--seq-len", 128, "--no-progress")
    res = _run("steer", "dyncount", "--method", "odp", "--target", 5, *calib, "--out", odp_file)
    assert res.exit_code == 0, res.output
    doc = json.loads(odp_file.read_text())
    assert doc["edits"][0]["mode"] == "odp" and all(0 < b < 1 for b in doc["edits"][0]["values"].values())
    res = _run("eval", "--tokens", 256, "--seq-len", 128, "--steer", odp_file, "--no-progress")
    assert res.exit_code == 0 and "perplexity" in res.output, res.output
    res = _run("steer", "dyncount", "--method", "top-any", "--target", 5, "--steps", 2, *calib, "--out", any_file)
    assert res.exit_code == 0 and (tmp_path / "a.gates.safetensors").is_file(), res.output
    res = _run("generate", "--prompt", "def f(x):", "--max-new-tokens", 4, "--steer", any_file)
    assert res.exit_code == 0, res.output


def test_cli_bad_input(tmp_path):
    out = tmp_path / "x.json"
    res = _run("steer", "dyncount", "--method", "top-x", "--out", out)
    assert res.exit_code == 2 and "'top-x' is not one of" in res.output
    res = _run("steer", "dyncount", "--method", "odp", "--beta", 1.5, "--out", out)
    assert res.exit_code == 2 and "error: odp: --beta must lie in [0, 1]" in res.output
    res = _run("steer", "dyncount", "--method", "odp", "--beta", 0.3, "--target", 5, "--out", out)
    assert res.exit_code == 2 and "exactly one of --beta / --target" in res.output
    res = _run("steer", "dyncount", "--method", "top-k", "--k", 9, "--out", out)
    assert res.exit_code == 2 and "--k 9 is more than the model's top_k=7" in res.output
    assert not out.exists()
    res = _run("steer", "dyncount", "--method", "top-k", "--k", 5, "--out", out)
    assert res.exit_code == 0, res.output
    res = _run("eval", default_model("coarse"), "--tokens", 256, "--steer", out, "--no-progress")
    assert res.exit_code == 2 and "was written for another model" in res.output and str(out) in res.output
