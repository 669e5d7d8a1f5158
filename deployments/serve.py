"""Serve screenline's deployments on this machine: a Prefect server, the `screenline` process work pool, the
deployments of prefect.yaml, and a worker. `make serve` / `make stop` call this; so does the deployment test.

    python -m deployments.serve start [--port 4200] [--state .prefect/serve] [--lake lake] [--no-ui]
    python -m deployments.serve stop [--state .prefect/serve]

The server binds to 127.0.0.1 only and keeps its SQLite database in PREFECT_HOME. The server and the worker run in
their own process groups; their PIDs (with each process's start time, so a reused PID is never signalled), logs and
the API address are written to the state folder. `stop` ends exactly those processes and their descendants (a
worker starts each flow run in a session of its own), SIGTERM then SIGKILL, and returns only once every one of them
has exited and, where it is ours, been reaped; nothing is found by name.

Another machine joins by running a worker on the same pool against this server's API (which then has to listen on
an address that machine can reach), with the lake on shared storage; see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deployments.zombies import ZOMBIE_AUTOMATION
from tasks.ingest import DEFAULT_INBOX, INBOX_ENV

REPO = Path(__file__).resolve().parent.parent
POOL = "screenline"
HOST = "127.0.0.1"


@dataclass
class Served:
    """What `start` started: the API address and the state folder holding PIDs and logs."""

    api_url: str
    ui_url: str
    state: Path
    server_pid: int
    worker_pid: int


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _env(api_url: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("SCREENLINE_TIMEZONE", "UTC")  # prefect.yaml's nightly schedule reads it at deploy time
    env.setdefault(INBOX_ENV, DEFAULT_INBOX)
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _spawn(name: str, args: list[str], state: Path, env: dict[str, str]) -> int:
    """Start a process in its own group, logging to state/<name>.log; record "PID START_TIME" in state/<name>.pid."""
    with open(state / f"{name}.log", "ab") as log:
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    (state / f"{name}.pid").write_text(f"{process.pid} {_start_time(process.pid)}")
    return process.pid


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _start_time(pid: int) -> str:
    fields = _stat(pid)
    return fields[19] if fields else ""


def _reap(pid: int) -> None:
    """Collect `pid`'s exit status if it is our child (when start and stop run in one process, as in tests)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    """Running (a zombie whose parent is not us has exited: its parent reaps it)."""
    _reap(pid)
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` now, found by parent PID: flow runs the worker started in sessions of their own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _check_port_free(port: int) -> None:
    """Refuse a port something else listens on: whatever answers there is not the server this starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            owners = _listeners(port)
            raise RuntimeError(f"port {port} on {HOST} is in use by another process"
                               + (f" (pid {', '.join(map(str, sorted(owners)))})" if owners else "")
                               + f" ({exc.strerror}): stop it, or serve on another port (make serve "
                                 f"SCREENLINE_PORT=...)") from None


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on HOST:port (from /proc/net/tcp: local address in hex, state 0A is LISTEN)."""
    wanted = f"{socket.inet_aton(HOST)[::-1].hex().upper()}:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] in (wanted, f"00000000:{port:04X}") and fields[3] == "0A":
            inodes.add(fields[9])
    return inodes


def _listeners(port: int, among: list[int] | None = None) -> set[int]:
    """PIDs (of `among`, else of every process) holding a socket that listens on HOST:port."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    pids = among if among is not None else [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]
    found = set()
    for pid in pids:
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                found.add(pid)
        except OSError:
            continue
    return found


def _wait_healthy(api_url: str, port: int, pid: int, timeout: float, log: Path) -> None:
    """Until the server we started answers on its port: /health says 200 *and* the socket listening there is held
    by our process tree (anything else answering there is not ours, and we never deploy to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise RuntimeError(f"the Prefect server exited while starting; see {log}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    if _listeners(port, [pid, *_descendants(pid)]):
                        return
                    raise RuntimeError(f"something other than the Prefect server started here answers "
                                       f"{api_url}/health; refusing to deploy to it (see {log})")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server did not answer {api_url}/health within {timeout:.0f} s; see {log}")


def _run(args: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{what} failed ({' '.join(args[1:])}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def start(port: int = 4200, state: Path | None = None, lake: str | None = None, ui: bool = True,
          timeout: float = 180.0, env: dict[str, str] | None = None, zombie_after: float | None = None) -> Served:
    """Start the server on 127.0.0.1:port, create the process pool, deploy prefect.yaml, create the automation that
    marks runs whose process died Crashed (deployments/zombies.py), start a worker.

    env: extra environment for all of them (PREFECT_HOME for a private database, SCREENLINE_TIMEZONE, ...).
    zombie_after: seconds without a heartbeat before a run is Crashed (default: three heartbeats, 9 minutes).
    """
    extra = dict(env or {})
    state = (state or Path(extra.get("PREFECT_HOME") or os.environ.get("PREFECT_HOME", REPO / ".prefect"))
             / "serve").resolve()
    state.mkdir(parents=True, exist_ok=True)
    running = [name for name in ("server", "worker") if _pid(state, name)]
    if running:
        raise RuntimeError(f"already serving from {state} ({', '.join(running)} running): `make stop` first")
    api_url, ui_url = f"http://{HOST}:{port}/api", f"http://{HOST}:{port}"
    _check_port_free(port)
    server_args = [_prefect(), "server", "start", "--host", HOST, "--port", str(port), "--no-background"]
    # the UI asks the server where its API is: the port served, not Prefect's default 4200
    server_env = _env(None, {**extra, "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(port),
                             "PREFECT_UI_API_URL": api_url})
    server_pid = _spawn("server", server_args + ([] if ui else ["--no-ui"]), state, server_env)
    try:
        _wait_healthy(api_url, port, server_pid, timeout, state / "server.log")
        client_env = _env(api_url, extra)
        _run([_prefect(), "work-pool", "create", POOL, "--type", "process", "--overwrite"], client_env,
             "creating the pool")
        _run([_prefect(), "--no-prompt", "deploy", "--all"], client_env, "deploying prefect.yaml")
        _run([sys.executable, "-m", "deployments.zombies"] + (["--within", str(zombie_after)] if zombie_after else []),
             client_env, "creating the zombie-run automation")
        worker_env = _env(api_url, {**extra, **({"SCREENLINE_LAKE": str(Path(lake).resolve())} if lake else {})})
        worker_pid = _spawn("worker", [_prefect(), "worker", "start", "--pool", POOL, "--type", "process"], state,
                            worker_env)
    except BaseException:
        stop(state)
        raise
    (state / "api.json").write_text(json.dumps({"api_url": api_url, "ui_url": ui_url}))
    return Served(api_url, ui_url, state, server_pid, worker_pid)


def _pid(state: Path, name: str) -> int | None:
    """The recorded PID of `name` if that same process (same start time) is still running."""
    try:
        pid_text, _, started = (state / f"{name}.pid").read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if not _alive(pid) or (started and _start_time(pid) != started):
        return None
    return pid


def stop(state: Path | None = None, grace: float = 20.0, kill_wait: float = 10.0) -> list[str]:
    """Stop the worker, then the server, with everything below them, by the PIDs recorded in `state`. Returns what
    it stopped; raises RuntimeError naming any process still running after SIGKILL."""
    state = (state or Path(os.environ.get("PREFECT_HOME", REPO / ".prefect")) / "serve").resolve()
    stopped = []
    for name in ("worker", "server"):
        pid = _pid(state, name)
        if pid is not None:
            _terminate(name, pid, grace, kill_wait)
            stopped.append(f"{name} (pid {pid})")
        (state / f"{name}.pid").unlink(missing_ok=True)
    (state / "api.json").unlink(missing_ok=True)
    return stopped


def _terminate(name: str, pid: int, grace: float, kill_wait: float) -> None:
    """SIGTERM `pid`'s process group and its descendants, SIGKILL what is left after `grace` seconds, and wait
    until all of them have exited (reaping our own child)."""
    tree = [pid, *_descendants(pid)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        _signal_group(pid, sig)
        for p in tree[1:]:
            _signal(p, sig)
        deadline = time.monotonic() + wait
        while (left := [p for p in tree if _alive(p)] + ([pid] if _group_alive(pid) else [])) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        if not left:
            return
    raise RuntimeError(f"{name}: process(es) {', '.join(map(str, sorted(set(left))))} still running after SIGKILL")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group we created with start_new_session: the process and its children
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Some process of the group is running (zombies whose parent is not us excepted)."""
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
               and (fields := _stat(int(e.name))) and int(fields[2]) == pgid and fields[0] != "Z"]
    return bool(members)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="server + pool + deployments + worker")
    p.add_argument("--port", type=int, default=int(os.environ.get("SCREENLINE_PORT", "4200")))
    p.add_argument("--state", type=Path, help="where PIDs and logs go (default: $PREFECT_HOME/serve)")
    p.add_argument("--lake", help="the lake the worker's runs use (default: $SCREENLINE_LAKE or ./lake)")
    p.add_argument("--no-ui", dest="ui", action="store_false")
    p.add_argument("--zombie-after", type=float, metavar="SECONDS",
                   help="a run with no heartbeat for this long is marked Crashed (default: three heartbeats)")
    p = sub.add_parser("stop", help="stop what start started")
    p.add_argument("--state", type=Path)
    args = parser.parse_args(argv)
    if args.command == "stop":
        stopped = stop(args.state)
        print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
        return 0
    try:
        served = start(args.port, args.state, args.lake, args.ui, zombie_after=args.zombie_after)
    except RuntimeError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    print(f"Prefect server: {served.ui_url} (UI), API {served.api_url}; pid {served.server_pid}\n"
          f"worker on pool '{POOL}': pid {served.worker_pid}\n"
          f"deployments: optimize/default, nightly/default (cron 0 2 * * *, {_env()['SCREENLINE_TIMEZONE']}), "
          f"ingest/default, screen/default, audit/default\n"
          f"runs whose process dies without a word are marked Crashed: automation '{ZOMBIE_AUTOMATION}'\n"
          f"logs and PIDs: {served.state}\n"
          f"run one:  PREFECT_API_URL={served.api_url} .venv/bin/prefect deployment run optimize/default\n"
          f"stop:     make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
