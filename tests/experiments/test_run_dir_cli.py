"""experiments/run_dir_cli.py: the command line of the experiments that read a trained run
refuses what it cannot use, naming it."""
import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))
from run_dir_cli import parse_run_args, run_parser  # noqa: E402


def parse(argv, several=False):
    parser = run_parser("test", "cfg.py", "out", several_runs=several)
    return parse_run_args(parser, argv, has_run=lambda args: args.run_dir)


def test_overrides_pass_through_and_runs_repeat():
    args, rest = parse(["--run-dir", "a", "--run-dir", "b", "--config.x=3"], several=True)
    assert args.run_dir == ["a", "b"] and rest == ["--config.x=3"]
    assert args.config == "cfg.py" and args.out == "out" and not args.toy


@pytest.mark.parametrize("argv, message", [
    (["--toy", "stray"], r"unrecognised arguments \['stray'\] \(overrides are --config.KEY=VALUE\)"),
    (["--toy", "--config.x"], r"unrecognised arguments \['--config.x'\]"),
    ([], r"give --run-dir RUN \(or --toy\)"),
])
def test_bad_command_lines_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert re.search(message, capsys.readouterr().err)
