"""build_report on recorded traces: sections in order, captions on every figure, graceful notes for
missing labels / fields / model, the caller's sections appended, clear errors on bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from moelab.analysis.expert_zeroing import next_token_loss, trace_batches, zeroed_expert
from moelab.analysis.headline import headline
from moelab.analysis.synthetic import SyntheticConfig, synthetic_trace
from moelab.errors import MoelabError, TraceError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.report import Section, build_report, figure_html, new_figure, table_html

ORDER = ["Summary", "Expert load", "Dead experts", "Co-activation", "Local routing consistency",
         "Specialisation", "Super experts", "Expert similarity"]


def _titles(page: str) -> list[str]:
    return re.findall(r"<h2>([^<]+)</h2>", page)


def _check_figures(page: str) -> int:
    figures = [f for f in re.findall(r"<figure>(.*?)</figure>", page, flags=re.S) if "<img " in f]
    for f in figures:
        caption = re.search(r"<figcaption>([^<]+)</figcaption>", f)
        assert caption and len(caption.group(1)) > 20, f[:200]
    return len(figures)


@pytest.fixture(scope="module")
def full_page(full_trace, model_dir):
    return build_report(full_trace, model=str(model_dir))


def test_full_report_sections_and_figures(full_page, full_trace):
    assert _titles(full_page) == ORDER
    # load heatmap, load by domain, co-activation, SRP, SCH, specialisation, activation maxima,
    # weight similarity, output similarity
    assert _check_figures(full_page) == 9
    assert f"{full_trace.num_tokens:,}" in full_page
    assert "code, drama, prose" in full_page
    assert "--act-max" not in full_page and "--model" not in full_page  # nothing missing


def test_super_expert_loss_effect_matches_a_direct_measurement(full_page, full_trace, model_dir):
    se = headline(full_trace).super_experts
    assert len(se.layer_S) >= 1
    view = open_model(str(model_dir))
    batches = trace_batches(full_trace.token_ids, full_trace.seq_ids, 4096)
    base = next_token_loss(view.model, batches)
    with zeroed_expert(view.block(int(se.layer_S[0])), int(se.expert_S[0])):
        zeroed = next_token_loss(view.model, batches)
    section = full_page.split("<h2>Super experts</h2>")[1]
    assert "Δ loss" in section and f"{base:.4f}" in section
    assert f"<td>{zeroed:.3g}</td><td>{zeroed - base:.3g}</td>" in section


def test_bare_trace_says_what_would_add_each_missing_part(bare_trace):
    page = build_report(bare_trace)
    assert _titles(page) == ORDER
    assert "<code>moelab trace --act-max</code>" in page
    assert page.count("needs a label per token") >= 3  # headline note, load by domain, specialisation
    assert _check_figures(page) == 4  # load, co-activation, SRP, SCH


def test_without_model_the_super_expert_table_asks_for_it(full_trace):
    page = build_report(full_trace)
    assert "<code>moelab report TRACE --model M</code>" in page
    assert "<th>Δ loss</th>" not in page
    assert "Expert similarity needs the model" in page


def test_extra_sections_come_last(full_trace):
    fig = new_figure(4, 2)
    fig.subplots().plot([1, 2, 3], [3.0, 3.1, 3.5])
    extra = Section("Compression", table_html(["ratio", "loss"], [[0.5, 3.1]]) + figure_html(fig, "Loss against ratio."))
    page = build_report(full_trace, extra_sections=[extra], max_layers=1)
    assert _titles(page) == [*ORDER, "Compression"]
    assert page.index("<h2>Compression</h2>") > page.index("<h2>Expert similarity</h2>")
    assert "Showing 1 of 2 layers" in page


def test_array_trace_without_token_or_sequence_ids():
    trace = synthetic_trace(SyntheticConfig(num_tokens=2048, num_layers=3, num_experts=16, top_k=2,
                                            seq_len=256, vocab_size=256))
    trace.seq_ids = None
    trace.token_ids = None
    page = build_report(trace, title="synthetic")
    assert "<title>synthetic</title>" in page
    assert "Vocabulary specialisation of layer" in page  # the note replacing the vocabulary table


def test_bad_input(full_trace, bare_trace, model_dir):
    with pytest.raises(MoelabError, match="selection is empty"):
        build_report(full_trace.select(tokens=(0, 0)))
    other = tiny_model("Qwen3-MoE", dtype=torch.float32, seed=1)
    with pytest.raises(TraceError, match="does not match the model"):
        build_report(bare_trace, model=other)


def test_label_selection_keeps_working(full_trace):
    page = build_report(full_trace.select(labels=["code"], layers=[1]))
    assert _titles(page) == ORDER
    assert np.isin(full_trace.select(labels=["code"]).labels, [0]).all()


def test_similarity_section_has_weight_and_output_figures(full_page, full_trace, model_dir):
    from moelab.analysis.similarity import weight_similarity

    view = open_model(str(model_dir))
    assert weight_similarity(view.blocks[0]).shape == (8, 8)
    section = full_page.split("<h2>Expert similarity</h2>")[1]
    assert section.count("<img ") == 2
    assert f"same {min(full_trace.num_tokens, 1024):,} traced hidden states" in section


def test_cache_size_table_names_the_smallest_cache_for_each_hit_rate(full_page):
    from moelab.report.build import cache_size_table

    html = cache_size_table([np.array([0.5, 0.85, 0.92, 0.99]), np.array([0.1, 0.2, 0.5, 0.85])], [1, 2], top_k=2)
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", html)
    assert cells == ["1", "2 (1.0× top-k)", "3 (1.5× top-k)", "4 (2.0× top-k)", "2", "4 (2.0× top-k)", "-", "-"]
    assert "LRU 90% hits" in full_page  # the report's routing-consistency section carries it
