"""Cache policies keyed on content, never on paths of the moment or run ids.

Prefect's default policy includes the flow run id, so it never hits across runs. These key on the task's inputs,
which carry content hashes (split hashes, checkpoint paths named by their key), and they return no key while the
file the task writes is missing: a cached result is never trusted for output that is not there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect.cache_policies import CachePolicy
from prefect.utilities.hashing import hash_objects


@dataclass
class OutputCache(CachePolicy):
    """Key: `namespace` and the task's inputs; None while `output(inputs)` does not exist.

    Pass `namespace` and `output` by keyword: CachePolicy's own dataclass fields come first.
    """

    namespace: str = ""
    output: Callable[[dict[str, Any]], Path] | None = None
    exclude: tuple[str, ...] = ()  # inputs that do not change the result (a run id)

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.output is not None and not self.output(inputs).exists():
            return None
        return hash_objects(self.namespace, {k: v for k, v in inputs.items() if k not in self.exclude})


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able or picklable parts: names work folders so outputs are found again."""
    return (hash_objects(*parts) or "")[:16]
