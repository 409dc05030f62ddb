"""The report in a real headless browser (Debian's ``chromium``): every image decodes, nothing is logged
to the console, and a screenshot is written next to the report. Skipped without Chromium, unless the
environment variable CI is set (CI installs it, see .ci/run), where a missing browser fails."""

from __future__ import annotations

import os

import pytest

from moelab.report import build_report, write_report
from moelab.report.browser import check_page, chromium_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def need_chromium():
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")


def test_report_loads_in_chromium(full_trace, model_dir, tmp_path):
    path = write_report(build_report(full_trace, model=str(model_dir)), tmp_path / "report.html")
    check = check_page(path, screenshot=path.with_suffix(".png"))
    assert check.images_total == 9
    assert check.images_ok == check.images_total, check
    assert check.console == [], check.console
    shot = check.screenshot.read_bytes()
    assert check.screenshot == (tmp_path / "report.png") and shot[:8] == PNG_MAGIC
    width, height = int.from_bytes(shot[16:20], "big"), int.from_bytes(shot[20:24], "big")
    assert (width, height) == (1200, 3000)


def test_report_without_optional_parts_loads(bare_trace, tmp_path):
    path = write_report(build_report(bare_trace), tmp_path / "bare.html")
    check = check_page(path)
    assert check.ok and check.images_total == 4, check


def test_the_check_catches_a_broken_image_and_a_console_error(tmp_path):
    # the same page machinery with one undecodable image and a script error: the check must fail
    from moelab.report import Section, render_page

    page = render_page("broken", [Section("A", '<img src="data:image/png;base64,AAAA" alt="x">'
                                              "<script>console.error('boom'); missingFunction();</script>")])
    path = write_report(page, tmp_path / "broken.html")
    check = check_page(path)
    assert (check.images_ok, check.images_total) == (0, 1)
    assert any("boom" in m for m in check.console)
    assert any("missingFunction" in m for m in check.console)
    assert not check.ok
