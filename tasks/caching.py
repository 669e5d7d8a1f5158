"""Cache policies keyed on content, never on paths of the moment or run ids.

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
