"""The benchmark harness runs end to end (`make bench-quick`), so it never rots. Nothing here asserts speed."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

from session_env import ENV


def test_quick_bench_measures_every_configuration_and_writes_its_outputs(tmp_path, prefect_server):
    command = [sys.executable, "-m", "benchmarks.bench", "--quick", "--threads", "2",
               "--lake", str(tmp_path / "no-lake"), "--out", str(tmp_path)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report_file,) = tmp_path.glob("*-quick.json")
    report = json.loads(report_file.read_text())
    names = [c["name"] for c in report["configs"]]
    assert names[:4] == ["baseline-torch", "baseline-ort", "resnet18-native-ort", "screennet-torch"]
    assert {"screennet-ort-fp32", "screennet-ort-int8-u8s8-per-tensor"} <= set(names)
    # a graph on OpenVINO, and the uint8-input graph (the full bench runs every graph on both engines)
    assert {"screennet-openvino-int8-u8s8-per-tensor", "screennet-ort-int8-u8s8-per-tensor-uint8-input"} <= set(names)
    for config in report["configs"]:
        assert "error" not in config, config.get("error")
        assert config["knee"]["batch"] in [p["batch"] for p in config["sweep"]]
        latency = config["latency_ms"]
        assert latency["p50"] <= latency["p99"]
        # batch 1 on one thread and on the two configured, the faster quoted with its count
        assert set(latency["p50_by_threads"]) == {"1", "2"}
        assert latency["p50"] == min(latency["p50_by_threads"].values())
        assert latency["p50_by_threads"][str(latency["threads"])] == latency["p50"]
        assert config["rss_mb"]["peak"] >= config["rss_mb"]["after_knee"] > 0
    assert report["machine"]["fp32_gemm_gflops"] > 0 and report["machine"]["int8_gemm_gops"] > 0
    assert "INT8 GEMM peak" in report_file.with_suffix(".md").read_text()
    assert report["host"]["packages"]["pyarrow"] == version("pyarrow")  # what the figures were measured on
    assert f"openvino {version('openvino')}" in report_file.with_suffix(".md").read_text()
    assert report["screen"]["flow"]["images"] == 2000 and report["screen"]["engine"]["images"] == 2000
    assert len(report["screen"]["flow"]["runs"]) == 1  # the smoke run: once, as a client of the session's server
    assert 0 <= report["screen"]["flow"]["teardown_s"] < report["screen"]["flow"]["seconds"]
    table = report_file.with_suffix(".md").read_text()
    assert "a client of a Prefect server, as deployed" in table
    assert "seed baseline: ResNet18 64→224, torch eager FP32" in table and "× baseline" in table
    assert report_file.with_name(report_file.stem + "-sweep.png").stat().st_size > 10_000
    levers = [lever["lever"] for lever in report["levers"]["levers"]]
    assert "FP32, one session, 2 threads, spinning off (as shipped)" in levers
    assert "FP32, 2 engines × 1 thread (one per core)" in levers
    # the quick run's two shapes, the default first, on both engines, then their OpenVINO engines again in turns,
    # each as a share of the default shape's in the same rounds
    from benchmarks.levers import SHAPES
    from tasks.train import TrainSettings

    assert SHAPES[0] == (TrainSettings().width, TrainSettings().stem, TrainSettings().depth)
    names = [f"width {w}, {stem} stem, depth {d}" for w, stem, d in SHAPES[:2]]
    assert f"{names[0]}, onnxruntime INT8-U8S8-PER-TENSOR (random weights)" in levers
    assert f"{names[1]}, openvino INT8-U8S8-PER-TENSOR (random weights)" in levers
    turns = {lever["lever"]: lever for lever in report["levers"]["levers"] if lever["lever"].endswith("in turns")}
    assert list(turns) == [f"{name}, openvino INT8-U8S8-PER-TENSOR, in turns" for name in names]
    default, other = turns.values()
    assert default["of_default"] == 1.0 and other["of_default"] > 0 and other["mmacs"] != default["mmacs"]
    # where the time goes: the fastest engine profiled by operator group, in the report and its table
    (profiled,) = report["profiles"]
    assert profiled["label"].startswith("fastest: ScreenNet") and "error" not in profiled
    assert {"conv stem", "conv depthwise", "conv 1×1"} <= {row[0] for row in profiled["rows"]}
    assert "Where the time goes (fastest: ScreenNet" in table
    assert "| FP32, spinning on |" in table and "× the default shape's in the same rounds" in table
    # the rows within 25% of the fastest, measured again in turns (on a noisy host one sweep each is no ranking)
    ranking = report["in_turns"]
    if "rows" in ranking:
        shares = [row["share"] for row in ranking["rows"]]
        assert shares == sorted(shares, reverse=True) and 0 < shares[-1] and shares[0] <= 1.0 and len(shares) >= 2
        assert all(row["rounds"] == 3 for row in ranking["rows"])
        assert "measured again in turns" in table and f"| {ranking['rows'][0]['label']} |" in table
    else:
        assert ranking == {"skipped": "one engine within the margin of the fastest: nothing to rank"}


def test_a_lake_without_a_model_gets_a_small_one_built_once_and_measured(tmp_path, prefect_server):
    from benchmarks.bench import fallback_lake, latest_model

    lake = tmp_path / "build" / "bench-lake"
    assert latest_model(lake) is None
    assert fallback_lake(lake, images=900, epochs=1, max_batch=8, knee_seconds=0.03) == lake
    model = latest_model(lake)  # one epoch rarely passes the gate: the newest registered version is measured then
    assert model is not None and model["version"].startswith("sn-")
    assert {c["name"] for c in model["manifest"].candidates} >= {"fp32", "int8-u8s8-per-tensor"}
    manifest = model["folder"] / "manifest.json"
    built = manifest.stat().st_mtime_ns
    fallback_lake(lake, images=900, epochs=1, max_batch=8, knee_seconds=0.03)  # the next bench reuses it
    assert manifest.stat().st_mtime_ns == built
