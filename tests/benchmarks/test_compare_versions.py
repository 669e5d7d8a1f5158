"""benchmarks/compare_versions.py's pairing on known score distributions (no lake, no engines)."""

from __future__ import annotations

import numpy as np

from benchmarks.compare_versions import paired_rows


def test_paired_rows_read_the_better_versions_lead_and_skip_what_only_one_scores():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 2000 + [0] * 2000, dtype=np.int8)
    signal = rng.normal(size=len(labels)) + 3.0 * labels
    strong, weak = signal + rng.normal(size=len(labels)) * 0.2, signal + rng.normal(size=len(labels)) * 1.5
    a = {("onnxruntime", "fp32"): strong, ("openvino", "fp32"): strong, ("onnxruntime", "int8"): strong}
    b = {("onnxruntime", "fp32"): weak, ("openvino", "fp32"): strong}
    rows = {(r["engine"], r["graph"]): r for r in paired_rows(a, b, labels)}
    assert set(rows) == {("onnxruntime", "fp32"), ("openvino", "fp32")}  # int8 only in A: nothing to pair
    lead = rows[("onnxruntime", "fp32")]
    assert lead["a"] > lead["b"] and lead["difference"] == round(lead["a"] - lead["b"], 4)
    assert 0 < lead["interval95"][0] < lead["difference"] < lead["interval95"][1]
    same = rows[("openvino", "fp32")]
    assert same["difference"] == 0 and same["interval95"] == [0, 0]
    assert lead["positives"] == 2000 and lead["negatives"] == 2000
