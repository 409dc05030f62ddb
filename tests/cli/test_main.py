from click.testing import CliRunner

import moelab
from moelab.cli import main


def test_version_and_help():
    runner = CliRunner()
    out = runner.invoke(main, ["--version"])
    assert out.exit_code == 0 and moelab.__version__ in out.output
    out = runner.invoke(main, ["--help"])
    assert out.exit_code == 0 and "Usage" in out.output


def test_lazy_attribute_error():
    try:
        moelab.not_a_thing  # noqa: B018
    except AttributeError as err:
        assert "not_a_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")
