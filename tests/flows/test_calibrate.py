"""`screenline calibrate` through the CLI and the flow: the verification half printed beside the shipped threshold,
--apply deciding from the next screen, a refusal that says how many positives it would take."""

from __future__ import annotations

import subprocess
import sys

import pytest
from session_env import ENV
from helpers import site_lake

from flows.calibrate import calibrate
from tasks.calibrate import CalibrationRefused

pytestmark = pytest.mark.usefixtures("prefect_server")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "screenline.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)


def test_calibrate_prints_the_verification_half_then_applies_and_screen_decides_with_it(tmp_path):
    lake = site_lake(tmp_path, 2000)
    shown = cli("calibrate", "--subset", "site", "--lake", str(lake.root))
    assert shown.returncode == 0, shown.stderr
    assert "on the verification half (no part in the choice):" in shown.stdout
    assert "site threshold" in shown.stdout and "shipped threshold" in shown.stdout
    assert "normals flagged per 1,000 screened" in shown.stdout and "not applied" in shown.stdout
    applied = cli("calibrate", "--subset", "site", "--apply", "--lake", str(lake.root))
    assert applied.returncode == 0 and "applied site:site to sn-site" in applied.stdout, applied.stderr
    screened = cli("screen", "--lake", str(lake.root))
    assert screened.returncode == 0 and "2000 re-decided at a changed threshold" in screened.stdout, screened.stderr


def test_a_subset_too_small_is_refused_saying_how_many_positives_it_needs(tmp_path):
    lake = site_lake(tmp_path, 200, "small")
    state = calibrate(subset="small", lake=str(lake.root), apply=True, return_state=True)
    assert state.is_failed()
    with pytest.raises(CalibrationRefused, match="needs ≥ 149 there, so the subset needs about 298 labelled"):
        state.result()
    refused = cli("calibrate", "--subset", "small", "--lake", str(lake.root))
    assert refused.returncode == 2 and "calibration refused" in refused.stderr
    assert (lake.root / "audits" / "calibrations").is_dir()  # the refused calibration is kept for the record
