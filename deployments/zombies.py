"""Flow runs whose process died without a word (the machine went down, kill -9, the OOM killer) marked Crashed.

A flow run's process tells the server it is alive with a heartbeat event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY
seconds (180 by default since Prefect 3.6.22). A worker marks a run Crashed when the process it started exits
badly, but a run whose whole machine died, worker and all, or that no worker started, stays Running for ever: the
nightly report never comes and nothing says why. Prefect's recipe for a self-hosted server
(docs: "How to detect and respond to zombie flows") is an automation that expects, after each heartbeat of a run,
another event of that run (a heartbeat or a state change) within a window, and marks the run Crashed when none
comes. `make serve` creates it (deployments/serve.py), with a window of MISSED_HEARTBEATS heartbeats: 9 minutes at
the default frequency, Prefect Cloud's own default.

    python -m deployments.zombies [--within SECONDS]    (against PREFECT_API_URL's server)
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from uuid import UUID

ZOMBIE_AUTOMATION = "screenline: crash flow runs that stopped sending heartbeats"
MISSED_HEARTBEATS = 3
"""Heartbeats a run may miss before it is called dead: one late or lost event never crashes a live run."""


def heartbeat_seconds() -> int:
    """This environment's flow-run heartbeat interval (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Prefect's default else).
    ValueError where heartbeats are off: there would be nothing to watch."""
    from prefect.settings import get_current_settings

    seconds = get_current_settings().flows.heartbeat_frequency
    if not seconds:
        raise ValueError("flow-run heartbeats are off (PREFECT_FLOWS_HEARTBEAT_FREQUENCY is unset): a dead run "
                         "could not be told from a live one; set it (at least 30 s)")
    return int(seconds)


def zombie_automation(within: timedelta):
    """The automation: after a run's heartbeat, any event of that run within `within`, else the run is Crashed."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run with no event for {within.total_seconds():.0f} s after a heartbeat is marked Crashed "
                    f"(its process died without saying so). Created by screenline's `make serve`.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            # any event of the run: a heartbeat, or a state change whatever the state's name
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=within,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within.total_seconds():.0f} s: its process died "
                                            f"without reporting (machine down, killed, out of memory)")],
    )


def watch_for_zombies(within: timedelta | None = None) -> UUID:
    """Create the automation on PREFECT_API_URL's server, replacing one of the same name (so `make serve` run again
    leaves one); `within` defaults to MISSED_HEARTBEATS heartbeats. Its id."""
    from prefect.client.orchestration import get_client

    heartbeat = heartbeat_seconds()
    within = within or timedelta(seconds=MISSED_HEARTBEATS * heartbeat)
    if within.total_seconds() < 2 * heartbeat:
        raise ValueError(f"a window of {within.total_seconds():g} s is under two heartbeats ({heartbeat} s apart): one "
                         f"late heartbeat would crash a live run")
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
            client.delete_automation(old.id)
        return client.create_automation(zombie_automation(within))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--within", type=float, default=None,
                        help=f"seconds without an event after a heartbeat before a run is Crashed (default "
                             f"{MISSED_HEARTBEATS} × the heartbeat interval)")
    args = parser.parse_args(argv)
    if args.within is not None and args.within <= 0:
        parser.error("--within must be positive")
    try:
        automation = watch_for_zombies(timedelta(seconds=args.within) if args.within else None)
    except ValueError as exc:
        parser.exit(2, f"zombies: error: {exc}\n")
    print(f"automation {automation}: {ZOMBIE_AUTOMATION}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
