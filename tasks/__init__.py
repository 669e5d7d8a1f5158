"""Prefect tasks by stage, each a thin wrapper over plain typed functions that tests call without Prefect."""

import screenline  # noqa: F401  (first: it picks Arrow's allocator before pyarrow loads)
