"""Retry and cache policies: every task's, in one place. Caches key on content, never on paths of the moment or run
ids; retries are for transient I/O only.

Prefect's default policy includes the flow run id, so it never hits across runs. These key on the task's inputs,
which carry content hashes (split hashes, checkpoint paths named by their key, an images file's image-id digest),
and they return no key while the output the task writes is missing or no longer current: a cached result is never
trusted for output that is not there, or that the lake has moved on from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects

from tasks.lake import Lake, landed_with


@dataclass
class OutputCache(CachePolicy):
    """Key: `namespace` and the task's inputs; None while `output(inputs)` does not exist, or while `current(inputs)`
    is false (an output that exists but no longer matches what it was made from).

    Pass the fields by keyword: CachePolicy's own dataclass fields come first.
    """

    namespace: str = ""
    output: Callable[[dict[str, Any]], Path] | None = None
    exclude: tuple[str, ...] = ()  # inputs that do not change the result (a run id)
    current: Callable[[dict[str, Any]], bool] | None = None

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.output is not None and not self.output(inputs).exists():
            return None
        if self.current is not None and not self.current(inputs):
            return None
        return hash_objects(self.namespace, {k: v for k, v in inputs.items() if k not in self.exclude})


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able or picklable parts: names work folders so outputs are found again."""
    return (hash_objects(*parts) or "")[:16]


def work_dir(lake_root: str, step: str, *parts: Any) -> Path:
    """Where a step's outputs for these inputs live: lake/models/work/<step>-<content key>."""
    return Lake.at(lake_root).work_dir(f"{step}-{content_key(step, *parts)}")


def _retry_on_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient I/O failures only; a bug or bad data fails at once."""
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


@dataclass
class ShardContentCache(CachePolicy):
    """Cache key: the shard's content hash, the lake and the options; never the path or the run id.

    Returns no key while the shard's images file is missing from the lake or landed with other options, so a
    deleted or new lake is always written, and a cached result is never trusted for data that is not there.
    """

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        ref = inputs["ref"]  # a tasks.shards.ShardRef
        lake = Lake.at(inputs["lake_root"])
        landed = lake.image_file(ref.shard_id)
        if not landed.exists() or landed_with(landed) != inputs["options"].landed_with():
            return None  # not landed, or landed since with other options: what a cached result says is not there
        return hash_objects("ingest-shard/v1", ref.sha256, str(lake.root), inputs["options"])


IO_RETRIES = dict(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_on_io_error)
