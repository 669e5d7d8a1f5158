"""`make stop` (deployments.serve.stop) returns only once everything it signalled has exited, and never signals a
process that merely reuses a recorded PID. No Prefect here: plain processes standing in for the server and worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import running

from deployments.serve import _spawn, stop

# Ignores SIGTERM, like a worker busy shutting down, and starts a grandchild in a session of its own, as Prefect's
# worker does for each flow run; writes the grandchild's PID to argv[1].
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                         start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def test_stop_returns_only_after_every_process_it_signalled_has_exited(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    pid = _spawn("worker", [sys.executable, "-c", STUBBORN, str(tmp_path / "child.pid")], state, dict(os.environ))
    deadline = time.monotonic() + 30
    while not (tmp_path / "child.pid").exists() or not (tmp_path / "child.pid").read_text():
        assert time.monotonic() < deadline, "the stand-in worker did not start its flow-run process"
        time.sleep(0.05)
    grandchild = int((tmp_path / "child.pid").read_text())
    try:
        assert stop(state, grace=1.0) == [f"worker (pid {pid})"]
        # no waiting here: stop() itself waited, through SIGKILL, for both
        assert not running(pid) and not running(grandchild)
        assert not Path(f"/proc/{pid}").exists()  # our own child is reaped, not left a zombie
        assert not (state / "worker.pid").exists()
    finally:
        for p in (pid, grandchild):
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass


def test_a_recorded_pid_now_used_by_another_process_is_not_signalled(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (state / "server.pid").write_text(f"{bystander.pid} 1")  # the PID, but not the start time we recorded
        assert stop(state, grace=1.0) == []
        assert bystander.poll() is None and running(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()
