"""The test session's environment: a private Prefect home and signing keys, and `ENV` for subprocesses.

Its own module, imported by this one name from conftest.py and the tests, so it runs once a session: pytest imports
conftest.py as `tests.conftest` (--import-mode=importlib), and a test's `import conftest` would run that file a
second time, making a second Prefect home and keys mid-session and an `ENV` the session's server never names.
"""

from __future__ import annotations

import os
import tempfile

# Before anything imports Prefect: runs never touch ~/.prefect or a configured server, and the ephemeral server
# gets the time it needs to start on a loaded 2-core machine.
PREFECT_HOME = tempfile.mkdtemp(prefix="screenline-prefect-")
os.environ["PREFECT_HOME"] = PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("SCREENLINE_LAKE", None)
# The session's own signing and trusted keys (models/signing.py): never the user's ~/.config/screenline.
KEYS = tempfile.mkdtemp(prefix="screenline-keys-")
os.environ["SCREENLINE_KEYS"] = KEYS
# and its own engine cache (models/engine.engine_cache): never the user's ~/.cache/screenline.
ENGINE_CACHE = tempfile.mkdtemp(prefix="screenline-engines-")
os.environ["SCREENLINE_ENGINE_CACHE"] = ENGINE_CACHE

ENV = dict(os.environ)
"""The environment tests give to subprocesses (the CLI, killed ingests). While the session's Prefect server runs it
names that server, so a subprocess's flow does not start an ephemeral server of its own (10-20 s each); a test
whose subprocess runs a flow asks for `prefect_server`."""
