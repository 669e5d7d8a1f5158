"""The command line as a user meets it: one-line errors without a traceback, and help that states the real defaults."""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from session_env import ENV
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


@pytest.fixture(scope="module")
def lakes(tmp_path_factory, prefect_server):
    """An empty lake's path, and a lake with images, a labelled subset and a registered, promoted model (not
    screened); the session's Prefect server, so each command does not start one of its own."""
    from prefect.settings import PREFECT_API_URL

    from helpers import images, register_model
    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.lake import Lake
    from tasks.samples import write_tar
    from tasks.shards import fingerprint

    root = tmp_path_factory.mktemp("cli")
    write_tar(root / "s.tar", *images(40, "cli-errors", prevalence=0.5))
    lake = Lake(root / "lake")
    lake.ensure_channels(1)
    ingest_shard(fingerprint(root / "s.tar"), lake, IngestOptions(channels=1, subset="holdout"))
    register_model(lake.root, "sn-cli", seed=0)
    (root / "a-file").write_text("not a lake\n")
    (root / "inbox").mkdir()
    return {"empty": str(root / "empty"), "lake": str(lake.root), "file": str(root / "a-file"),
            "inbox": str(root / "inbox"), "shard": str(root / "s.tar"), "api": PREFECT_API_URL.value()}


BAD = [  # (arguments, the lake to give, what the one line says); each as a user would type it
    (["screen"], "empty", "no promoted model in"),
    (["audit"], "empty", "no promoted model in"),
    (["audit"], "lake", "no predictions by sn-cli"),
    (["audit", "--subset", "nope"], "lake", "no predictions by sn-cli"),
    (["calibrate", "--subset", "holdout"], "empty", "no promoted model in"),
    (["nightly", "--inbox", "/nonexistent/inbox"], "empty", "inbox /nonexistent/inbox is not a folder"),
    (["screen", "--version", "../outside"], "lake", "not a plain name"),
    (["screen", "--version", "sn-nope"], "lake", "no model version 'sn-nope'"),
    (["screen", "--engine", "tensorrt"], "lake", "engine=tensorrt needs an NVIDIA GPU"),
    (["screen"], "file", "is a file, not a folder"),
    (["ingest", "{shard}"], "file", "is a file, not a folder"),
    (["ingest", "/nonexistent/shard.tar"], "empty", "no such shard: /nonexistent/shard.tar"),
    (["ingest", "/nonexistent/*.tar"], "empty", "no shard matches"),
    (["ingest", "/etc/hostname"], "empty", "not a shard: /etc/hostname"),
    (["ingest", "{shard}", "--replace", "0123456789abcdef"], "lake", "--replace 0123456789abcdef: no such shard"),
    (["ingest", "{shard}", "--replace", "../x"], "lake", "--replace ../x: '../x' is not a shard id"),
    (["ingest", "{shard}", "--channels", "3"], "lake", "holds 1-channel images; --channels 3 conflicts"),
    (["optimize"], "empty", "holds no images: run `screenline ingest`"),
    (["optimize", "--test-subset", "nope"], "lake", "subset 'nope' cannot join the held-out test split"),
    (["optimize", "--calibrate-on", "crossfit", "--folds", "1"], "lake", "cross-fitting needs 2 or more folds"),
    (["optimize", "--baseline", "/nonexistent/model.pt"], "lake", "baseline checkpoint /nonexistent/model.pt"),
    (["results", "--out", "{tmp}/r.txt"], "lake", "no current predictions in"),
    (["promote", "sn-nope"], "lake", "no model version 'sn-nope'"),
    (["sign", "sn-nope"], "lake", "no model version 'sn-nope'"),
    (["models"], "empty", "no models in"),
]


@pytest.mark.parametrize("argv, lake, says", BAD, ids=[" ".join(a) + f" ({lake})" for a, lake, _ in BAD])
def test_every_bad_invocation_is_one_error_line_without_a_traceback(lakes, tmp_path, argv, lake, says):
    argv = [a.format(shard=lakes["shard"], tmp=tmp_path) for a in argv]
    env = {**ENV, "PREFECT_API_URL": lakes["api"]}
    out = subprocess.run([sys.executable, "-m", "screenline.cli", *argv, "--lake", lakes[lake]], capture_output=True,
                         text=True, timeout=300, env=env)
    errors = [line for line in out.stderr.splitlines() if line.startswith("screenline:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("screenline: error: ") and says in errors[0], errors


def test_optimize_says_the_knees_fit_where_the_manifest_records_one_and_nothing_where_it_does_not():
    from screenline.cli import _fit

    assert _fit({"batch": 64, "fit": {"call_ms": 0.2733, "image_ms": 0.0881}}) == \
        " (a call 0.273 ms + 0.0881 ms an image)"
    assert _fit({"batch": 64}) == "" and _fit({"batch": 64, "fit": {"call_ms": 0.3}}) == ""


@pytest.mark.parametrize("given", ["0", "-3", "2.5", "x"])
def test_an_epoch_count_below_one_or_not_whole_is_a_usage_error_and_the_flow_refuses_it_too(given, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["optimize", "--epochs", given])
    assert exited.value.code == 2 and f"argument --epochs: '{given}' epochs: give a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("flag, given", [("--width", "0"), ("--depth", "-0.5"), ("--depth", "5"), ("--width", "x")])
def test_a_width_or_depth_outside_the_nets_range_is_a_usage_error(flag, given, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["optimize", flag, given])
    assert exited.value.code == 2 and f"argument {flag}: '{given}': give a multiplier above 0" in capsys.readouterr().err
    assert vars(build_parser().parse_args(["optimize", flag, "0.5"]))[flag[2:]] == 0.5


@pytest.mark.usefixtures("prefect_server")
def test_the_optimize_flow_refuses_zero_epochs_before_reading_the_lake(tmp_path):
    from flows.optimize import optimize

    state = optimize(lake=str(tmp_path / "lake"), epochs=0, return_state=True)
    assert state.is_failed() and "epochs 0: give a whole number of epochs, at least 1" in str(
        state.result(raise_on_failure=False))
    assert not (tmp_path / "lake").exists()
