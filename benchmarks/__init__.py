"""The performance harness: measurements anyone can re-run, never timed tests."""

import screenline  # noqa: F401  (first: it picks Arrow's allocator before pyarrow loads)
