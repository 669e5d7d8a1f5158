"""The screening path never imports torch (a nightly worker needs pyarrow, ONNX Runtime and Prefect only)."""

from __future__ import annotations

import subprocess
import sys


def test_screening_modules_do_not_import_torch():
    code = (
        "import sys; import flows.ingest, flows.screen, flows.audit, flows.nightly, tasks.ingest, tasks.metrics, "
        "tasks.audit, tasks.report, models.engine, models.registry, deployments.serve, "
        "tasks.dataset, screenline.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'torchvision')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
