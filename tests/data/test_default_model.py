"""The shipped default model: loads with stock transformers and moelab, and its card's numbers hold."""

from __future__ import annotations

import json

import pytest
import torch

import moelab
from moelab.models import open_model, reference_forward
from moelab.train.evaluate import evaluate_model_dir


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((moelab.default_model() / "card.json").read_text(encoding="utf-8"))


def test_loads_with_plain_transformers_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = moelab.default_model()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    ids = tok("def main():\n    ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))


def test_opens_as_a_moelab_view_whose_reference_matches_the_blocks():
    view = open_model(moelab.default_model(), dtype=torch.float64, experts_implementation="eager")
    assert [b.layer for b in view.blocks] == list(range(view.num_layers))
    block = view.blocks[0]
    assert (block.num_experts, block.top_k, block.scoring) == (8, 2, "softmax")
    hidden_TH = torch.randn(16, block.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = reference_forward(block, hidden_TH)
        theirs = block.module(hidden_TH[None])
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    # Qwen3-MoE's router softmax runs in float32 even in a float64 model: ~1e-7 absolute differences
    torch.testing.assert_close(ours, theirs.reshape_as(ours), rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 1e-2  # the tolerance is far below the size of the output


def test_validation_perplexity_matches_the_card_within_one_percent(card):
    res = evaluate_model_dir(moelab.default_model(), moelab.default_corpus())
    assert set(res.perplexity) == set(card["perplexity"]) == {"code", "drama", "prose"}
    for domain, ppl in card["perplexity"].items():
        assert res.perplexity[domain] == pytest.approx(ppl, rel=0.01), domain


def test_card_reports_a_real_fit_and_specialised_routing(card):
    # a real fit: far below the uniform-guess perplexity of the 4,096-token vocabulary
    assert all(p < 200 for p in card["perplexity"].values()), card["perplexity"]
    # no collapsed layer and no dead expert: every expert takes over 1 % of all domains' assignments
    load = card["load_by_domain"]
    for layer in range(len(load["code"])):
        mean_E = [sum(load[d][layer][e] for d in load) / len(load) for e in range(len(load["code"][layer]))]
        assert min(mean_E) > 0.01, (layer, mean_E)
    # domains are routed differently somewhere: some expert's share differs by 1.5x between domains
    spread = max(max(load[a][i][e] / load[b][i][e] for a in load for b in load)
                 for i in range(len(load["code"])) for e in range(len(load["code"][i])))
    assert spread > 1.5, spread


def test_default_model_names():
    from moelab.errors import MoelabError

    assert moelab.default_model() == moelab.default_model(moelab.data.DEFAULT_MODEL)
    for name in moelab.data.MODEL_NAMES:
        try:
            path = moelab.default_model(name)
        except MoelabError as err:  # a model not shipped yet names the commands that make it
            assert f"--preset {name}" in str(err) and "not shipped yet" in str(err)
        else:
            assert (path / "config.json").is_file() and path.name == name
    with pytest.raises(MoelabError, match="expected one of fine, coarse, dense"):
        moelab.default_model("large")
