"""The benchmark harness runs end to end (`make bench-quick`), so it never rots. Nothing here asserts speed."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ENV


def test_quick_bench_measures_every_configuration_and_writes_its_outputs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--lake", str(tmp_path / "no-lake"),
                           "--out", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report_file,) = tmp_path.glob("*-quick.json")
    report = json.loads(report_file.read_text())
    names = [c["name"] for c in report["configs"]]
    assert names[:4] == ["baseline-torch", "baseline-ort", "resnet18-native-ort", "screennet-torch"]
    assert {"screennet-ort-fp32", "screennet-ort-int8-u8s8-per-tensor"} <= set(names)
    for config in report["configs"]:
        assert "error" not in config, config.get("error")
        assert config["knee"]["batch"] in [p["batch"] for p in config["sweep"]]
        assert config["latency_ms"]["p50"] <= config["latency_ms"]["p99"]
        assert config["rss_mb"]["peak"] >= config["rss_mb"]["after_knee"] > 0
    assert report["machine"]["fp32_gemm_gflops"] > 0
    assert report["screen"]["flow"]["images"] == 2000 and report["screen"]["engine"]["images"] == 2000
    table = report_file.with_suffix(".md").read_text()
    assert "seed baseline: ResNet18 64→224, torch eager FP32" in table and "× baseline" in table
    assert report_file.with_name(report_file.stem + "-sweep.png").stat().st_size > 10_000
