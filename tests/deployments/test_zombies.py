"""The zombie-run automation's window (the automation itself runs against a real server in test_serve.py)."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from deployments.serve import REPO
from deployments.zombies import heartbeat_seconds, watch_for_zombies


def test_a_window_under_two_heartbeats_is_refused_before_the_server_is_asked():
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        assert heartbeat_seconds() == 30
        with pytest.raises(ValueError, match="under two heartbeats .* would crash a live run"):
            watch_for_zombies(timedelta(seconds=45))  # no server is running: it never gets that far


def test_the_command_says_what_is_wrong_and_exits_2():
    done = subprocess.run([sys.executable, "-m", "deployments.zombies", "--within", "0"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--within must be positive" in done.stderr
    done = subprocess.run([sys.executable, "-m", "deployments.zombies", "--within", "40"], cwd=REPO,
                          capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
                               "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert done.returncode == 2 and "zombies: error: a window of 40 s is under two heartbeats" in done.stderr
