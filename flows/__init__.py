"""One module per Prefect flow. Flows compose tasks; nothing else."""

import screenline  # noqa: F401  (first: it picks Arrow's allocator before pyarrow loads)
