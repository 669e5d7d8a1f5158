"""A screening worker installed without the `optimize` extra: ingest, screen, audit and nightly run; optimize says
in one line what to install.

The worker is this test's own Python with torch, torchvision and onnxscript made unimportable (an import finder that
refuses them, as a bare `pip install .` leaves them missing), running the real CLI against a real lake and Prefect.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from session_env import ENV
from helpers import images, register_model
from tasks.samples import write_png_folder, write_tar

WORKER = textwrap.dedent("""
    import importlib.abc, json, sys

    class WithoutTheOptimizeExtra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "torchvision", "onnxscript"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, WithoutTheOptimizeExtra())
    from screenline.cli import main

    codes = [main(argv) for argv in json.loads(sys.argv[1])]
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision", "onnxscript"))
    print("WORKER " + json.dumps({"codes": codes, "loaded": loaded}))
""")


@pytest.mark.usefixtures("prefect_server")
def test_a_worker_without_torch_ingests_screens_audits_and_runs_the_night_and_optimize_names_the_extra(tmp_path):
    lake = tmp_path / "lake"
    write_tar(tmp_path / "holdout.tar", *images(40, "worker-holdout", prevalence=0.5), prefix="h")
    write_png_folder(tmp_path / "inbox" / "night-1", images(30, "worker-night")[0], None, prefix="scan")
    register_model(lake, "sn-worker", seed=3, threshold=0.0)  # torch here, in the test; the worker has none
    argvs = [["ingest", str(tmp_path / "holdout.tar"), "--subset", "holdout", "--lake", str(lake)],
             ["screen", "--lake", str(lake)],
             ["audit", "--lake", str(lake)],
             ["nightly", "--inbox", str(tmp_path / "inbox"), "--lake", str(lake)],
             ["optimize", "--lake", str(lake)]]
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(argvs)], env=ENV, capture_output=True, text=True,
                         timeout=400, cwd=Path(__file__).resolve().parents[2])
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("WORKER ")]
    result = json.loads(line.removeprefix("WORKER "))
    # threshold 0 flags every image: all 20 positives found, too few to show 98% (exit 3, "inconclusive")
    assert result["codes"] == [0, 0, 3, 3, 2], out.stderr[-3000:]
    assert result["loaded"] == []
    assert len(list((lake / "predictions" / "sn-worker").glob("*.parquet"))) == 2  # the hold-out and the night
    assert len(list((lake / "audits" / "reports").glob("*.html"))) == 2
    assert "screenline: error: screenline optimize needs the `optimize` extra" in out.stderr
    assert "missing: torch" in out.stderr and "pip install '.[optimize]'" in out.stderr
