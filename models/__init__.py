"""Model architectures, export, engines and the registry.

Importing this package is cheap: nothing here imports torch at module level except the modules that train and
export, which only `optimize` uses.
"""

import screenline  # noqa: F401  (first: it picks Arrow's allocator before pyarrow loads)
