"""The report's steering section: the score grid, the section's parts, `moelab report --steer` on a
model saved with the shipped tokenizer, and the page in a real headless browser."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from moelab.cli import main
from moelab.models import open_model
from moelab.report import build_report, write_report
from moelab.report.browser import check_page, chromium_path
from moelab.report.steering import score_grid, steering_section
from moelab.steer import make_steering, write_steering
from moelab.steer.files import SteeringEdit


def _spec(model):
    view = open_model(model)
    layer = view.blocks[0].layer
    ranking = [{"layer": b.layer, "expert": e, "score": (e - 3) / 10} for b in view.blocks for e in range(b.num_experts)]
    return view, make_steering(view, SteeringEdit(mode="off", experts={layer: (6, 7)}),
                               made={"method": "risk-diff"}, ranking=ranking)


def test_score_grid_places_every_ranked_row():
    ranking = [{"layer": 3, "expert": 1, "score": 0.5}, {"layer": 1, "expert": 0, "score": -0.2},
               {"layer": 9, "expert": 0, "score": 1.0}]  # a layer the model lacks is left out
    grid = score_grid(ranking, [1, 3], 2)
    assert grid[1, 1] == 0.5 and grid[0, 0] == -0.2 and np.isnan(grid[0, 1]) and np.isnan(grid[1, 0])


def test_section_has_the_heatmap_and_the_perplexity_ratio(model_dir):
    view, spec = _spec(model_dir)
    ppl = {"without": {"code": 10.0, "drama": 20.0}, "with": {"code": 11.0, "drama": 40.0}}
    section = steering_section(spec, [b.layer for b in view.blocks], 8, ppl)
    assert section.title == "Steering" and section.html.count("<img") == 1
    assert "with steering" in section.html and "<td>2</td>" in section.html and "<td>1.1</td>" in section.html


def test_cli_report_with_a_steering_file(tiny_model_dir, tmp_path):
    import moelab.trace

    docs = [list(range(i, i + 40)) for i in range(0, 120, 40)]
    moelab.trace.record(str(tiny_model_dir), docs, tmp_path / "t", seq_len=32, progress=False)
    view, spec = _spec(tiny_model_dir)
    write_steering(tmp_path / "s.json", view, spec.edits, made=spec.made, ranking=spec.ranking)
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", str(tmp_path / "t"), "--model", str(tiny_model_dir), "--steer",
                                    str(tmp_path / "s.json"), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert "<h2>Steering</h2>" in page and "with steering" in page
    res = CliRunner().invoke(main, ["report", str(tmp_path / "t"), "--steer", str(tmp_path / "s.json"), "-o",
                                    str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "--steer: needs --model" in res.output


def test_steering_section_loads_in_chromium(full_trace, model_dir, tmp_path):
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    view, spec = _spec(model_dir)
    ppl = {"without": {"code": 10.0}, "with": {"code": 12.0}}
    page = build_report(full_trace, extra_sections=[steering_section(spec, [b.layer for b in view.blocks], 8, ppl)])
    check = check_page(write_report(page, tmp_path / "r.html"))
    assert check.ok and check.images_ok == check.images_total and check.console == [], check
