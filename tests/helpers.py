"""Small builders the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tasks.samples import generate


def images(n: int, name: str, site: str = "a", prevalence: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """`n` generated 64×64 grayscale images and labels, distinct for each `name`."""
    return generate(n, prevalence=prevalence, seed=7, site=site, name=name)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares a huge image (decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def lake_rows(lake: Path, folder: str = "images", columns: list[str] | None = None) -> dict[str, list]:
    """All rows of a lake folder as a dict of columns ({} when it has no files)."""
    files = sorted((lake / folder).glob("*.parquet"))
    if not files:
        return {}
    return pq.read_table(lake / folder, columns=columns).to_pydict()


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie has exited: only its parent's reaping is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def task_states(flow_state) -> list[str]:
    """"task-name:State" of every task run of a flow run, sorted."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    return sorted(f"{r.name.rsplit('-', 1)[0]}:{r.state.name}" for r in runs)


def spot_detector(centre: float = 37.0, scale: float = 6.0):
    """A hand-made model that finds bright blobs: the largest difference-of-box-filters response, as a logit.

    Deterministic and meaningful without training (positives score higher; dimmer images score lower), so audit
    tests have real sensitivity and drift to measure.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SpotDetector(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.float().mean(dim=1, keepdim=True)
            dog = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) - F.avg_pool2d(x, 11, 1, 5,
                                                                                 count_include_pad=False)
            return (dog.amax(dim=(1, 2, 3)) - centre) / scale

    detector = SpotDetector()
    detector.export_key = ("spot-detector", centre, scale)  # no weights: these two numbers are the whole model
    return detector


_EXPORTED: dict[tuple, bytes] = {}
"""register_model's graphs by (net, seed) or a hand-made model's `export_key`: torch's exporter takes ~6 s a graph
on 2 cores, and the same random-weight ScreenNet of a seed is registered by many tests."""


def register_model(lake: Path, version: str, seed: int, threshold: float = 0.5, knee: int | None = 16,
                   reference: np.ndarray | None = None, model=None, passed_gate: bool | None = True) -> str:
    """A random-weight ScreenNet (or `model`) exported and registered as `version`, signed with the session's key,
    and promoted when it passed its gate (no training: seconds).

    reference: pixels whose scores become the model's drift reference (as optimize writes its validation scores).
    passed_gate: the held-out gate's verdict to record (None: none recorded).
    """
    import pyarrow as pa
    import torch

    from models.engine import OrtEngine, scores
    from models.export import export_onnx
    from models.nets import ScreenNet
    from models.registry import Registry, host_fingerprint
    from tasks.audit import REFERENCE_FILE
    from tasks.lake import Lake, write_table_atomic

    registry = Registry(Lake(lake))
    folder = registry.folder(version)
    onnx = folder / "model-fp32.onnx"
    key = ("screennet", seed) if model is None else getattr(model, "export_key", None)
    if key in _EXPORTED:  # the same net exported before in this session: its graph, not another ~6 s export
        folder.mkdir(parents=True, exist_ok=True)
        onnx.write_bytes(_EXPORTED[key])
    else:
        torch.manual_seed(seed)
        export_onnx((model or ScreenNet()).eval(), onnx)
        if key is not None:
            _EXPORTED[key] = onnx.read_bytes()
    if reference is not None:
        write_table_atomic(folder / REFERENCE_FILE, pa.table({"score": scores(OrtEngine(onnx), reference)}))
    host = host_fingerprint("onnxruntime", "fp32")
    manifest = {"shipping": {"engine": "onnxruntime", "candidate": "fp32", "precision": "fp32",
                             "file": "model-fp32.onnx", "threshold": threshold},
                "gates": {"target_sensitivity": 0.98},
                "knees": {host: {"batch": knee, "images_per_s": 1.0, "batch1_latency_ms": 1.0}} if knee else {}}
    if passed_gate is not None:
        manifest.update(passed_gate=passed_gate, promotion="test model" if passed_gate else
                        "NOT promoted: test sensitivity 0.9000 (90/100) at the frozen threshold is below the target")
    registry.register(version, manifest)
    if passed_gate:
        registry.promote(version)
    return version


def screen_plain(lake, version: str | None = None) -> dict[str, str]:
    """What the screen flow does, without Prefect: move orphans aside, then each shard; shard_id → status. Each
    call is a run of its own, with its own run id, as each flow run is."""
    import uuid

    from tasks.predictions import sweep_orphans
    from tasks.screen import resolve_model, screen_shard

    sweep_orphans(lake)
    model = resolve_model(lake, version, workers=1)
    run_id = str(uuid.uuid4())
    return {f.stem: screen_shard(f.stem, model, run_id).status for f in lake.shard_files()}


def screen_triaged(lake, version: str | None = None) -> dict[str, str]:
    """What the screen flow does, without Prefect, the way the flow does it: move orphans aside, list the shards and
    triage them (the footer memos of tasks/footers.py), then score or re-decide the pending ones; shard_id → status."""
    import uuid

    from tasks.predictions import sweep_orphans
    from tasks.screen import list_shards_task, resolve_model, screen_shard, triage

    sweep_orphans(lake)
    model = resolve_model(lake, version, workers=1)
    pending, current = triage(model, list_shards_task.fn(str(lake.root)))
    run_id = str(uuid.uuid4())
    return {**{s.shard_id: s.status for s in current},
            **{shard: screen_shard(shard, model, run_id).status for shard, _ in pending}}


def labelled_lake_with_model(lake: Path, holdout: Path, hold_x: np.ndarray, hold_y: np.ndarray,
                             sensitivity: float = 1.0):
    """Ingest `holdout` (the shards of hold_x/hold_y) as the labelled subset "holdout" and promote a spot detector
    whose threshold is calibrated there for `sensitivity` (default: every hold-out positive found, so ≥ 183 of them
    show 98% at the exact lower bound), its drift reference 600 site-a images.
    Returns (the ingest report, the threshold)."""
    from flows.ingest import ingest
    from models.engine import OrtEngine, scores
    from tasks.thresholds import threshold_for_sensitivity
    from tasks.samples import SITES

    held = ingest([str(holdout)], lake=str(lake), subset="holdout")
    register_model(lake, "sn-probe", seed=0, model=spot_detector())
    engine = OrtEngine(lake / "models" / "sn-probe" / "model-fp32.onnx")
    threshold = threshold_for_sensitivity(scores(engine, hold_x[:, None]), hold_y, sensitivity)
    reference = generate(600, 0.1, 7, SITES["a"], "reference")[0][:, None]
    register_model(lake, "sn-spot", seed=0, threshold=threshold, reference=reference, model=spot_detector())
    return held, threshold


def site_lake(root: Path, n: int, name: str = "site"):
    """A Lake with one labelled subset `name` of n images (half positive, clear findings the spot detector separates
    well), scored by the spot detector registered as sn-site with a shipped threshold of 0.0: every image flagged,
    the specificity a site threshold should win back."""
    from tasks.ingest import IngestOptions, ingest_shard
    from tasks.lake import Lake
    from tasks.samples import Site, write_tar
    from tasks.shards import fingerprint

    x, y = images(n, f"calibrate-{name}-{n}", site=Site("clear", lesion_scale=3.0), prevalence=0.5)
    write_tar(root / f"{name}.tar", x, y, prefix=name)
    lake = Lake(root / "lake")
    lake.ensure_channels(1)
    ingest_shard(fingerprint(root / f"{name}.tar"), lake, IngestOptions(channels=1, subset=name))
    register_model(lake.root, "sn-site", seed=0, threshold=0.0, model=spot_detector())
    screen_plain(lake)
    return lake
