"""Steering files: write -> load round trip, checks against the model, and apply_steering equal to
the edits it names."""

import json

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.steer import (
    SteeringEdit,
    SteeringFileError,
    apply_steering,
    experts_off,
    load_steering,
    scale_weights,
    switch_experts,
    write_steering,
)


@pytest.fixture(scope="module")
def view():
    return open_model(tiny_model("Qwen3-MoE"))


def _ids(view):
    return torch.randint(0, view.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def _logits(view, *edits):
    with torch.no_grad():
        handles = [e() for e in edits]
        out = view.model(_ids(view)).logits
        for h in handles:
            h.remove()
    return out


def test_round_trip_and_apply_equals_the_named_edit(view, tmp_path):
    path = tmp_path / "s.json"
    spec = write_steering(path, view, SteeringEdit(mode="off", experts={1: [2, 5]}),
                          made={"method": "test"}, ranking=[{"layer": 1, "expert": 2}])
    doc = json.loads(path.read_text())
    assert doc["format"] == "moelab.steering" and doc["edits"][0]["experts"] == {"1": [2, 5]}
    assert doc["made"]["method"] == "test" and "date" in doc["made"]
    loaded = load_steering(path, view)
    assert loaded.edits == spec.edits and loaded.path == str(path)
    plain = _logits(view)
    got = _logits(view, lambda: apply_steering(view, loaded))
    want = _logits(view, lambda: experts_off(view, {1: [2, 5]}))
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert torch.equal(_logits(view), plain), "removing the handle restores the model"


def test_several_edits_compose_and_one_handle_removes_them(view, tmp_path):
    path = tmp_path / "s.json"
    edits = [SteeringEdit(mode="soft-on", experts={0: [1]}, strength=0.5),
             SteeringEdit(mode="soft-off", experts={0: [4], 1: [0]}, strength=0.5),
             SteeringEdit(mode="scale", experts={1: [3]}, strength=2.0)]
    write_steering(path, view, edits)
    spec = load_steering(path, view)
    plain = _logits(view)
    with torch.no_grad():
        h = apply_steering(view, spec)
        got = view.model(_ids(view)).logits
        assert h.counts[0]["tokens"] == 18 and h.counts[1]["tokens"] == 18
        h.remove()
        assert torch.equal(view.model(_ids(view)).logits, plain)
    want = _logits(view, lambda: switch_experts(view, on={0: [1]}, off={0: [4], 1: [0]}, strength=0.5),
                   lambda: scale_weights(view, {1: {3: 2.0}}))
    assert torch.equal(got, want)
    with pytest.raises(MoelabError, match="already removed"):
        h.remove()


def test_mismatched_model_is_named_with_both_fingerprints(view, tmp_path):
    path = tmp_path / "s.json"
    write_steering(path, view, SteeringEdit(mode="on", experts={0: [1]}))
    other = open_model(tiny_model("Qwen3-MoE", num_experts=6))
    with pytest.raises(SteeringFileError, match=r"s\.json was written for another model: file "
                                                r"Qwen3MoeForCausalLM \(config \w+, routers \w+\), model "
                                                r"Qwen3MoeForCausalLM .*num_local_experts=8 \(file\) vs 6 \(model\)"):
        load_steering(path, other)


def test_out_of_range_and_malformed_files_are_named(view, tmp_path):
    path = tmp_path / "s.json"
    write_steering(path, view, SteeringEdit(mode="off", experts={1: [2]}))
    doc = json.loads(path.read_text())

    def bad(change, match):
        d = json.loads(json.dumps(doc))
        change(d)
        path.write_text(json.dumps(d))
        with pytest.raises(SteeringFileError, match=match):
            load_steering(path, view)

    bad(lambda d: d["edits"][0].update(experts={"1": [8]}), r"layer 1: expert ids \[8\] must be distinct and in \[0, 8\)")
    bad(lambda d: d["edits"][0].update(experts={"7": [0]}), r"layer 7 is not an MoE layer of the model \(MoE layers: \[0, 1\]\)")
    bad(lambda d: d["edits"][0].update(experts={"1": list(range(7))}), "takes at most 6")
    bad(lambda d: d["edits"][0].update(mode="sideways"), "mode: expected one of")
    bad(lambda d: d.update(format="other"), "'format' must be 'moelab.steering'")
    bad(lambda d: d["edits"][0].pop("experts"), "missing or malformed field")
    path.write_text("{not json")
    with pytest.raises(SteeringFileError, match="not readable JSON"):
        load_steering(path, view)
    with pytest.raises(SteeringFileError, match="does not exist"):
        load_steering(tmp_path / "none.json", view)
    with pytest.raises(MoelabError, match="soft-on: strength must be a finite number >= 0"):
        SteeringEdit(mode="soft-on", experts={0: [1]}, strength=-1.0)
    with pytest.raises(MoelabError, match="scale: strength"):
        SteeringEdit(mode="scale", experts={0: [1]})
