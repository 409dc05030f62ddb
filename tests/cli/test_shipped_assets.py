"""``moelab data build`` and ``moelab export`` never replace the shipped corpus / model by accident."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from moelab.cli import main
from moelab.cli._options import PACKAGE_DIR, output_dir
from moelab.data import ASSETS
from moelab.errors import MoelabError


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("args", [["data", "build"], ["export", "{run}"]])
def test_without_out_the_command_refuses_and_writes_nothing(tmp_path, args):
    before = _snapshot(ASSETS)
    args = [a.format(run=tmp_path) for a in args]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "--out is required" in res.output and "--into-package" in res.output
    inside = ASSETS / "corpus" if args[0] == "data" else ASSETS / "models" / "coarse"
    res = CliRunner().invoke(main, [*args, "--out", str(inside)])
    assert res.exit_code == 2 and "inside the installed moelab package" in res.output, res.output
    assert _snapshot(ASSETS) == before


def test_output_dir_rules(tmp_path):
    shipped = ASSETS / "corpus"
    assert output_dir(tmp_path / "c", False, shipped, "corpus") == tmp_path / "c"
    assert output_dir(None, True, shipped, "corpus") == shipped
    assert output_dir(shipped, True, shipped, "corpus") == shipped
    with pytest.raises(MoelabError, match="give one"):
        output_dir(tmp_path / "c", True, shipped, "corpus")
    with pytest.raises(MoelabError, match="inside the installed moelab package"):
        output_dir(PACKAGE_DIR / "somewhere", False, shipped, "corpus")
