"""The command line as a user meets it: one-line errors without a traceback, and help that states the real defaults."""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from screenline.cli import build_parser


def _subcommand(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def test_optimize_help_states_the_flows_own_defaults_and_passes_only_what_was_given():
    from flows.optimize import optimize

    defaults = {name: p.default for name, p in inspect.signature(optimize.fn).parameters.items()}
    checked = []
    for action in _subcommand("optimize")._actions:
        if action.default is not argparse.SUPPRESS or action.dest == "help":
            continue
        value = defaults[action.dest]  # every suppressed option is a flow parameter
        stated = re.search(r"default:? ([^\s;:)]+)|^(\S+) \(default\)", action.help or "")
        assert stated, f"--{action.dest}'s help does not state its default"
        expected = ("on" if value else "off") if isinstance(value, bool) else str(value)
        assert (stated.group(1) or stated.group(2)) == expected, action.dest
        checked.append(action.dest)
    assert {"epochs", "width", "target_sensitivity", "spec_margin", "delta", "folds", "seed", "distill"} <= set(checked)
    given = vars(_subcommand("optimize").parse_args(["--epochs", "3"]))
    assert given["epochs"] == 3 and "width" not in given and "target_sensitivity" not in given


@pytest.mark.parametrize("argv, says", [
    (["models"], "no models in"),
    (["results"], "no promoted model in"),
    (["optimize", "--baseline", "/nonexistent/model.pt"], "baseline checkpoint /nonexistent/model.pt does not exist"),
    (["ingest", "/nonexistent/shard.tar"], "no such shard: /nonexistent/shard.tar"),
])
def test_a_bad_invocation_is_one_line_on_stderr_and_exit_2(tmp_path: Path, argv, says):
    out = subprocess.run([sys.executable, "-m", "screenline.cli", *argv, "--lake", str(tmp_path / "lake")],
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("screenline: error: ")
    assert says in lines[0] and out.stdout == ""
