"""evaluate_compressed: perplexity as run.evaluate computes it; KL and top-1 against a window loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.compress.apply import apply_plan, save_compressed
from moelab.compress.baselines import plan_random
from moelab.compress.evaluate import evaluate_compressed, evaluate_path
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.run.evaluate import eval_windows, evaluate_streams


def _streams():
    gen = torch.Generator().manual_seed(0)
    return {"code": torch.randint(0, 64, (70,), generator=gen), "prose": torch.randint(0, 64, (50,), generator=gen)}


def _loop_kl_top1(model, reference, stream, seq_len):
    kl, agree, n = 0.0, 0, 0
    for w in eval_windows(stream, seq_len):
        p = F.log_softmax(reference(input_ids=w[None]).logits[0, :-1].double(), -1)
        q = F.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
        for s in range(p.shape[0]):
            kl += float((p[s].exp() * (p[s] - q[s])).sum())
            agree += int(p[s].argmax() == q[s].argmax())
            n += 1
    return kl / n, agree / n


@torch.no_grad()
def test_perplexity_kl_and_top1(strong_model):
    model = strong_model("Qwen3-MoE")
    pruned = apply_plan(model, plan_random(open_model(model), None, CompressSpec(ratio=0.5, seed=1)))
    streams = _streams()
    res = evaluate_compressed(pruned, streams, reference=model, seq_len=16, batch_size=3)
    base = evaluate_streams(pruned, streams, 16, 3)
    assert res.loss == pytest.approx(base.loss, rel=1e-12) and res.tokens == base.tokens
    assert res.perplexity["code"] == pytest.approx(math.exp(base.loss["code"]))
    assert res.params == sum(p.numel() for p in pruned.parameters())
    for domain, stream in streams.items():
        kl, top1 = _loop_kl_top1(pruned, model, stream, 16)
        assert res.kl[domain] == pytest.approx(kl, rel=1e-9)
        assert res.top1[domain] == pytest.approx(top1)
    assert min(res.kl.values()) > 1e-4 and max(res.top1.values()) < 1.0  # pruning 4 of 8 experts shows


@torch.no_grad()
def test_reference_equal_to_model_gives_zero_kl(strong_model):
    model = strong_model("Mixtral")
    res = evaluate_compressed(model, _streams(), reference=model, seq_len=16)
    assert all(abs(v) < 1e-12 for v in res.kl.values()) and all(v == 1.0 for v in res.top1.values())
    plain = evaluate_compressed(model, _streams(), seq_len=16)
    assert plain.kl is None and plain.loss == pytest.approx(res.loss)


def test_foreign_token_ids_are_refused(strong_model):
    model = strong_model("Mixtral")
    with pytest.raises(MoelabError, match="token id 70 but the model's vocabulary has 64"):
        evaluate_compressed(model, {"code": torch.tensor([1, 2, 70, 3] * 10)}, seq_len=8)
    other = strong_model("Mixtral", vocab_size=80)
    with pytest.raises(MoelabError, match="reference: vocabulary of 80"):
        evaluate_compressed(model, _streams(), reference=other, seq_len=8)


def test_model_with_another_tokenizer_is_refused(strong_model, tmp_path):
    from moelab.data import default_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "tokenizer.json").write_text("{}")
    model = strong_model("Mixtral")
    plan = plan_random(open_model(model), None, CompressSpec(ratio=0.0))
    out = save_compressed(apply_plan(model, plan), plan, tmp_path / "m", tokenizer_from=default_corpus())
    with pytest.raises(MoelabError, match="tokenised for another model"):
        evaluate_path(out, corpus)
    with pytest.raises(MoelabError, match="does not exist"):
        evaluate_path(out, default_corpus(), reference_dir=tmp_path / "missing")


@pytest.mark.parametrize("family", ["DBRX", "JetMoE", "Llama4", "GPT-OSS"])
@torch.no_grad()
def test_every_family_evaluates(family, strong_model):
    model = strong_model(family)
    res = evaluate_compressed(model, _streams(), reference=model, seq_len=16)
    assert all(abs(v) < 1e-12 for v in res.kl.values()) and all(v == 1.0 for v in res.top1.values())
    assert all(math.isfinite(v) for v in res.perplexity.values())
    assert not hasattr(model.config, "num_experts_per_tok") or family != "DBRX"  # restored
