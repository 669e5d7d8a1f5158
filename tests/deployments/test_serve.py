"""The deployments on a real Prefect server: `prefect deployment run optimize/default` through the real CLI.

Starts what `make serve` starts (a server on a free 127.0.0.1 port with its own database, the process pool, the
deployments of prefect.yaml, a worker), runs optimize on a tiny lake through the deployment, waits for it to
finish, checks the registered model and that the run's final state is its gate's verdict, and stops everything by PID.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from helpers import images, running

from deployments.serve import REPO, start, stop
from flows.ingest import ingest
from models.registry import PROMOTED, GateFailed, Registry
from tasks.lake import Lake
from tasks.samples import Site, write_tar

pytestmark = pytest.mark.usefixtures("prefect_server")

CLEAR = Site("clear", lesion_scale=3.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    for i in range(2):
        write_tar(root / "shards" / f"s{i}.tar", *images(400, f"serve-{i}", site=CLEAR, prevalence=0.5),
                  prefix=f"s{i}")
    ingest([str(root / "shards")], lake=str(root / "lake"))
    env = {"PREFECT_HOME": str(root / "home"), "SCREENLINE_TIMEZONE": "Europe/Berlin",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"}
    served = start(free_port(), state=root / "state", lake=str(root / "lake"), ui=True, env=env)
    try:
        yield served, root, {**os.environ, **env, "PREFECT_API_URL": served.api_url}
    finally:
        stopped = stop(served.state)  # returns once both, and every flow run below them, have exited
        assert len(stopped) == 2, stopped
        assert not running(served.server_pid) and not running(served.worker_pid)


def prefect(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv" / "bin" / "prefect"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_optimize_default_runs_through_the_cli_and_registers_a_model(served):
    info, root, env = served
    assert info.api_url.startswith("http://127.0.0.1:")
    run = prefect(env, "deployment", "run", "optimize/default", "--param", "epochs=1", "--param", "max_batch=8",
                  "--param", "knee_seconds=0.03",
                  "--param", "calibrate_on=val", "--param", "engine=onnxruntime",  # deterministic: see test_optimize
                  "--watch", "--watch-interval", "2", "--watch-timeout", "480", timeout=540)
    output = run.stdout + run.stderr
    worker_log = (root / "state" / "worker.log").read_text()
    registry = Registry(Lake(root / "lake"))
    versions = registry.versions()
    assert len(versions) == 1, output + worker_log[-4000:]  # it ran to register
    (version,) = versions
    manifest = registry.manifest(version)
    assert manifest.training["settings"]["epochs"] == 1  # the CLI's parameter reached the flow
    # One epoch on ~560 training images learns little (test AUC 0.4-0.6 over seeds, ~1.0 only after ~24 epochs), so
    # whether its val-calibrated threshold keeps 98% of the 57 test positives is a coin flip that differs between
    # hosts; what the CLI must show is the gate's verdict, whichever it is
    if manifest.promoted:
        assert run.returncode == 0, output + worker_log[-4000:]
        assert "Completed" in output
        assert registry.promoted() == version and manifest.test["sensitivity"] >= 0.98
    else:
        assert run.returncode != 0 and "Failed" in output, output
        assert f"{version} registered but NOT promoted" in worker_log  # the flow's own words, in the worker's log
        assert manifest.test["sensitivity"] < 0.98 and not (registry.root / PROMOTED).exists()
        with pytest.raises(GateFailed, match="did not pass its held-out sensitivity gate"):
            registry.load_engine(version)  # screening refuses it unless told otherwise
    registry.load_engine(version, allow_failed_gate=True)  # files verified against the manifest


def test_the_nightly_deployment_runs_at_two_in_the_configured_time_zone(served):
    _, _, env = served
    shown = prefect(env, "deployment", "inspect", "nightly/default")
    assert shown.returncode == 0, shown.stderr
    assert "'cron': '0 2 * * *'" in shown.stdout and "'timezone': 'Europe/Berlin'" in shown.stdout
    for name in ("ingest/default", "screen/default", "audit/default"):
        assert prefect(env, "deployment", "inspect", name).returncode == 0, name


def test_the_ui_on_a_port_other_than_4200_calls_the_api_on_that_port(served):
    """What the UI's page asks the server for before it calls the API (an HTTP check, not a browser: it reads the
    address the UI will use)."""
    import json
    import urllib.request

    info, _, _ = served
    assert not info.ui_url.endswith(":4200")
    with urllib.request.urlopen(f"{info.ui_url}/ui-settings", timeout=10) as response:
        settings = json.loads(response.read())
    assert settings["api_url"] == info.api_url
    with urllib.request.urlopen(f"{settings['api_url']}/health", timeout=10) as response:
        assert response.status == 200


def test_a_port_something_else_answers_on_is_refused_and_nothing_is_deployed(tmp_path):
    import http.server
    import threading

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    impostor = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    try:
        port = impostor.server_address[1]
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is in use by another process \\(pid "
                                               f"{os.getpid()}\\)"):
            start(port, state=tmp_path / "state", env={"PREFECT_HOME": str(tmp_path / "home")})
        state = tmp_path / "state"
        assert state.is_dir() and sorted(p.name for p in state.iterdir()) == []  # no server, no worker started
    finally:
        impostor.shutdown()
        thread.join()
        impostor.server_close()
