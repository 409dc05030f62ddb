"""The shipped models: load with stock transformers and moelab, and their cards' numbers hold.

Every test runs for each model shipped in ``assets/models`` (``fine``, ``coarse``, ``dense``; see
``moelab.default_model``); a model not shipped yet is not a test case.
"""

from __future__ import annotations

import json

import pytest
import torch

import moelab
from moelab.data import MODEL_NAMES
from moelab.data.corpus import MANIFEST
from moelab.data.sources import sha256_file
from moelab.errors import MoelabError
from moelab.models import open_model, reference_forward
from moelab.run.evaluate import evaluate_model_dir

CLASSES = {"fine": "DeepseekV3ForCausalLM", "coarse": "Qwen3MoeForCausalLM", "dense": "Qwen3ForCausalLM"}
ROUTING = {"fine": (32, 7, "sigmoid"), "coarse": (8, 2, "softmax")}  # experts, top-k, scoring


def _shipped() -> list[str]:
    names = []
    for name in MODEL_NAMES:
        try:
            moelab.default_model(name)
        except MoelabError:
            continue
        names.append(name)
    return names


SHIPPED = _shipped()
SHIPPED_MOE = [n for n in SHIPPED if n in ROUTING]


def _card(name: str) -> dict:
    return json.loads((moelab.default_model(name) / "card.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", SHIPPED)
def test_loads_with_plain_transformers_and_generates(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = moelab.default_model(name)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == CLASSES[name]
    ids = tok("def main():\n    ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_shares_the_corpus_tokenizer(name):
    path = moelab.default_model(name)
    assert sha256_file(path / "tokenizer.json") == sha256_file(moelab.default_corpus() / "tokenizer.json")


@pytest.mark.parametrize("name", SHIPPED_MOE)
def test_opens_as_a_moelab_view_whose_reference_matches_the_blocks(name):
    view = open_model(moelab.default_model(name), dtype=torch.float64, experts_implementation="eager")
    assert [b.layer for b in view.blocks] == list(range(view.num_layers))[len(view.dense_layers):]
    block = view.blocks[0]
    assert (block.num_experts, block.top_k, block.scoring) == ROUTING[name]
    hidden_TH = torch.randn(16, block.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = reference_forward(block, hidden_TH)
        theirs = block.module(hidden_TH[None])
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    # the routers score in float32 even in a float64 model: ~1e-7 absolute differences
    torch.testing.assert_close(ours, theirs.reshape_as(ours), rtol=1e-5, atol=1e-6)
    assert ours.abs().max() > 1e-2  # the tolerance is far below the size of the output


@pytest.mark.parametrize("name", SHIPPED)
def test_validation_perplexity_matches_the_card_within_one_percent(name):
    card = _card(name)
    if card["corpus_manifest_sha256"] != sha256_file(moelab.default_corpus() / MANIFEST):
        pytest.skip(f"{name}: trained on an earlier corpus; retrain it (moelab train --preset {name})")
    res = evaluate_model_dir(moelab.default_model(name), moelab.default_corpus())
    assert set(res.perplexity) == set(card["perplexity"]) == {"code", "drama", "prose"}
    for domain, ppl in card["perplexity"].items():
        assert res.perplexity[domain] == pytest.approx(ppl, rel=0.01), domain


@pytest.mark.parametrize("name", SHIPPED)
def test_card_reports_a_real_fit(name):
    # far below the uniform-guess perplexity of the 4,096-token vocabulary
    card = _card(name)
    assert all(p < 200 for p in card["perplexity"].values()), card["perplexity"]


@pytest.mark.parametrize("name", SHIPPED_MOE)
def test_card_reports_balanced_and_specialised_routing(name):
    load = _card(name)["load_by_domain"]
    n_experts = len(load["code"][0])
    # no collapsed layer and no dead expert: every expert takes over 1 % of all domains' assignments
    for layer in range(len(load["code"])):
        mean_E = [sum(load[d][layer][e] for d in load) / len(load) for e in range(n_experts)]
        assert min(mean_E) > 0.01, (layer, mean_E)
    # domains are routed differently somewhere: some expert's share differs by 1.5x between domains
    spread = max(max(load[a][i][e] / load[b][i][e] for a in load for b in load)
                 for i in range(len(load["code"])) for e in range(n_experts))
    assert spread > 1.5, spread


def test_default_model_names():
    assert moelab.default_model() == moelab.default_model(moelab.data.DEFAULT_MODEL)
    assert moelab.data.DEFAULT_MODEL in SHIPPED
    for name in MODEL_NAMES:
        if name in SHIPPED:
            assert moelab.default_model(name).name == name
        else:  # a model not shipped yet names the commands that make it
            with pytest.raises(MoelabError, match=f"not shipped yet.*--preset {name}"):
                moelab.default_model(name)
    with pytest.raises(MoelabError, match="expected one of fine, coarse, dense"):
        moelab.default_model("large")
