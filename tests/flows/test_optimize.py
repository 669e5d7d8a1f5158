"""The `optimize` flow end to end on a tiny lake (seconds), its cache, its gates and its registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.ingest import ingest
from flows.optimize import NotPromoted, optimize
from helpers import images, task_states
from models import tensorrt
from models.engine import close_to_fastest
from models.registry import Manifest, Registry
from tasks.dataset import make_split
from tasks.lake import Lake
from tasks.optimize import GateSettings, register_version
from tasks.samples import write_tar

pytestmark = pytest.mark.usefixtures("prefect_server")

# one training; cross-fitting has its own test. ONNX Runtime alone: its scores are deterministic, so which candidate
# ships (and whether a one-epoch model passes the test gate) does not follow a noisy knee race between engines;
# the race itself has its own test (the first below) and tests/models/test_autotune.py
FAST = dict(epochs=1, max_batch=8, knee_seconds=0.03, calibrate_on="val", engine="onnxruntime")
NO_INT8 = dict(int8_auc_tolerance=-1.0)  # every INT8 graph fails the real AUC gate (FP32's minus its > -1): FP32 ships


@pytest.fixture(scope="module")
def tiny_lake(tmp_path_factory) -> Path:
    """~900 labelled images, half positive, from two sites."""
    root = tmp_path_factory.mktemp("optimize")
    for i, site in enumerate("ab"):
        write_tar(root / "shards" / f"s{i}.tar", *images(450, f"opt-{i}", site=site, prevalence=0.5), prefix=f"s{i}")
    ingest([str(root / "shards")], lake=str(root / "lake"))
    return root / "lake"


def run(lake: Path, **params):
    state = optimize(lake=str(lake), return_state=True, **{**FAST, **params})
    registry = Registry(Lake(lake))
    return state, registry


def fp32_export(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A registered version's FP32 graph and checkpoint laid out as export and training leave them."""
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "model-fp32.onnx").write_bytes((folder / "model-fp32.onnx").read_bytes())
    (export_dir / "export.json").write_text(json.dumps(
        {"files": {"fp32": "model-fp32.onnx"}, "fp32_max_abs_diff_vs_torch": 0.0, "opset": 18}))
    ckpt = tmp_path / "ckpt" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((folder / "model.pt").read_bytes())
    (ckpt.parent / "model.json").write_text((folder / "model.json").read_text())
    return export_dir, ckpt


def latest_manifest(registry: Registry) -> Manifest:
    return max((registry.manifest(v) for v in registry.versions()), key=lambda m: m.registered_at)


def test_optimize_registers_a_version_whose_promotion_matches_its_test_gate(tiny_lake):
    state, registry = run(tiny_lake, engine="auto")  # on a CPU host: ONNX Runtime and OpenVINO compete
    manifest = latest_manifest(registry)
    test = manifest.test
    assert manifest.promoted == (test["sensitivity"] >= 0.98)
    assert state.is_completed() == manifest.promoted
    if manifest.promoted:
        assert registry.promoted() == manifest.version
    ship = manifest.shipping
    shipped = next(c for c in manifest.candidates if c["name"] == ship.candidate)
    assert shipped["engine"] == ship.engine and shipped["threshold"] == ship.threshold
    # the CPU engines competed on the same graphs; what ships is the fastest that passed: the passing candidates
    # within RUNOFF_MARGIN of the fastest sweep were measured again in turns and the largest share there ships (a
    # sweep alone is not a ranking: tests/models/test_autotune.py pins the rule on hand-made figures); a version
    # shipping OpenVINO carries the fastest passing ONNX Runtime candidate for hosts without it
    assert {c["engine"] for c in manifest.candidates} == {"onnxruntime", "openvino"}
    passing = [c for c in manifest.candidates if c["passes"]]
    if passing:
        assert shipped["passes"]
        close = close_to_fastest(passing, lambda c: c["knee"]["images_per_s"])
        if len(close) > 1:
            assert all("runoff" in c["knee"] for c in close)
            assert shipped["knee"]["runoff"]["share"] == max(c["knee"]["runoff"]["share"] for c in passing
                                                             if "runoff" in c["knee"])
        else:
            assert shipped["knee"]["images_per_s"] == max(c["knee"]["images_per_s"] for c in passing)
    if ship.engine == "openvino":
        assert manifest.fallback.engine == "onnxruntime" and manifest.fallback.file in manifest.files
    else:
        assert ship.engine == "onnxruntime" and manifest.fallback is None
    stored = registry.read_manifest(manifest.version)  # as written: each figure once, in candidates
    assert manifest.format == stored["format"] == 2 and "thresholds" not in stored and "metrics" not in stored
    assert manifest.extra == {}
    assert set(manifest.files) >= {"model-fp32.onnx", "model-int8-u8s8-per-tensor.onnx",
                                      "model-int8-s8s8-per-channel.onnx", "model.pt"}
    knee = next(iter(manifest.knees.values()))
    swept = [point[0] for point in knee["sweep"]]
    assert swept[:4] == [1, 2, 4, 8] and knee["batch"] in swept and knee["images_per_s"] > 0
    assert manifest.export["fp32_max_abs_diff_vs_torch"] < 1e-4
    assert manifest.export["batchnorm_folded"] is True  # counted in the graph: no BatchNormalization node
    from models.nets import ScreenNetConfig
    from tasks.train import TrainSettings

    assert {k: manifest.architecture[k] for k in ScreenNetConfig().as_dict()} == ScreenNetConfig(
        channels=1, width=TrainSettings().width, stem=TrainSettings().stem).as_dict()  # all of it: rebuildable
    # the threshold with its rule, and the operating curves on validation and test, shipped point marked
    calibration = ship.calibration
    val_positives = make_split(Lake(tiny_lake)).counts["val"]["positives"]
    assert calibration["rule"] == "pac" and calibration["delta"] == 0.05 and calibration["positives"] == val_positives
    assert calibration["guaranteed"] == (val_positives >= 149) and calibration["threshold"] == ship.threshold
    shipped = next(c for c in manifest.candidates if c["name"] == ship.candidate)
    assert [row["at"] for row in shipped["curve"]] == ["95%", "97%", "98%", "99%", "shipped"]
    assert shipped["curve"][-1]["threshold"] == ship.threshold
    assert [row["at"] for row in manifest.test["curve"]][-1] == "shipped"
    # the shipped engine loads, verified, and its threshold reaches the target on val
    engine = registry.load_shipped(manifest.version, ship)  # whatever its gate said (screening checks that)
    assert engine.precision == ship.precision and engine.name == ship.engine
    assert shipped["val_table"]["sensitivity"] >= 0.98
    # no baseline given: the non-inferiority gate was skipped, and the manifest says so
    assert "non-inferiority gate was not applied" in manifest.baseline["skipped"]
    assert manifest.candidates and all(not c["noninferiority"] for c in manifest.candidates)


def recomputed_side_by_side(folder: Path, manifest: Manifest) -> list[dict]:
    """The side-by-side's score-based figures recomputed from the scores stored beside the model."""
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.metrics import auc, table_at
    from tasks.parity import matched_specificity

    table = pq.read_table(folder / manifest.baseline["scores_file"]).to_pydict()
    split, labels = np.array(table["split"]), np.array(table["label"])
    rows = []
    for column, threshold in (("candidate", manifest.shipping.threshold),
                              ("baseline", manifest.baseline["threshold"])):
        s = np.array(table[column], dtype=np.float64)
        val, test = split == "val", split == "test"
        t = table_at(s[test], labels[test], threshold)
        rows.append({"val_auc": auc(s[val], labels[val]), "test_auc": auc(s[test], labels[test]),
                     "val_specificity_at_target": matched_specificity(s[val], labels[val], 0.98),
                     "test_specificity_at_target": matched_specificity(s[test], labels[test], 0.98),
                     "tp": t.tp, "fn": t.fn, "tn": t.tn, "fp": t.fp})
    return rows


def test_a_baseline_identical_to_the_candidate_passes_and_its_figures_recompute_from_the_stored_scores(tiny_lake):
    _, registry = run(tiny_lake, **NO_INT8)  # FP32 ships
    first = latest_manifest(registry)
    checkpoint = registry.folder(first.version) / "model.pt"  # model.json beside it names the architecture
    # the same training (cached, no distillation), FP32 again: the baseline's graph is the candidate's
    state, registry = run(tiny_lake, **NO_INT8, baseline=str(checkpoint))
    manifest = latest_manifest(registry)
    ni = manifest.baseline["noninferiority"]
    for where in ("val", "test"):
        assert ni[where]["passes"] and ni[where]["difference"] == 0.0 and ni[where]["interval"] == [0.0, 0.0]
    assert manifest.passed_gate == (manifest.test["sensitivity"] >= 0.98)  # only sensitivity can refuse it
    assert "against the baseline" in manifest.promotion
    assert manifest.training["settings"]["teacher"] is None  # a baseline is not a teacher unless --distill
    rows = manifest.baseline["side_by_side"]
    assert [r["model"] for r in rows] == ["onnxruntime fp32 (ships)", "baseline screennet"]
    for row, again in zip(rows, recomputed_side_by_side(registry.folder(manifest.version), manifest)):
        for key in ("val_auc", "test_auc", "val_specificity_at_target", "test_specificity_at_target"):
            assert row[key] == pytest.approx(again[key], abs=1e-12), key
        assert {k: row["test_table"][k] for k in ("tp", "fn", "tn", "fp")} == \
            {k: again[k] for k in ("tp", "fn", "tn", "fp")}
    assert rows[0]["speedup_vs_baseline"] == pytest.approx(rows[0]["images_per_s"] / rows[1]["images_per_s"])
    assert manifest.baseline["checkpoint_sha256"] and manifest.baseline["knee"]["batch1_latency_ms"] > 0


def test_a_weak_candidate_against_a_stronger_trained_baseline_is_refused_with_the_difference(tiny_lake):
    # `--baseline train`: a ResNet18 at 64×64 trained on the same split; the candidate is forced weak
    state, registry = run(tiny_lake, baseline="train", epochs=1, width=0.25, distill=True, **NO_INT8)
    manifest = latest_manifest(registry)
    assert state.is_failed() and not manifest.promoted and not manifest.passed_gate
    test = manifest.baseline["noninferiority"]["test"]
    assert not test["passes"] and test["interval"][0] < -0.03
    message = str(state.result(raise_on_failure=False))
    assert f"difference {test['difference']:+.4f}" in message
    assert f"95% CI {test['interval'][0]:+.4f} to {test['interval'][1]:+.4f}" in message
    assert "try:" in message and "--epochs" in message
    assert manifest.baseline["arch"] == "resnet18-native" and manifest.baseline["source"] == "train"
    assert manifest.training["settings"]["teacher"]  # distilled from it, as asked
    fp32 = next(c for c in manifest.candidates if c["name"] == "fp32")
    # on val it was not shown non-inferior either; with no candidate that was, val does not choose and says so
    assert fp32["noninferiority"] and not fp32["noninferiority"]["passes"]
    assert "no candidate was shown non-inferior to the baseline on val" in fp32["why"]


def test_a_held_out_subset_joins_every_test_gate_without_retraining(tiny_lake, tmp_path):
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(tiny_lake, lake)  # the trainings cached in it are found again (keyed on content, not the path)
    write_tar(tmp_path / "eval.tar", *images(300, "opt-eval", site="a", prevalence=0.5), prefix="ev")
    ingest([str(tmp_path / "eval.tar")], lake=str(lake), subset="evaluation")
    _, registry = run(lake, **NO_INT8)
    plain = latest_manifest(registry)
    trained = {p: p.stat().st_mtime_ns for p in (lake / "models" / "work").glob("train-*/model.pt")}
    run(lake, **NO_INT8, test_subsets=["evaluation"])
    joined = latest_manifest(registry)
    assert joined.version != plain.version
    # the same trained model, judged on more: no training ran (no new checkpoint, none rewritten)
    assert {p: p.stat().st_mtime_ns for p in (lake / "models" / "work").glob("train-*/model.pt")} == trained
    assert joined.files["model.pt"] == plain.files["model.pt"]
    parts = joined.data["held_out"]
    assert parts["split"] == plain.data["counts"]["test"] and parts["subset evaluation"]["images"] == 300
    assert joined.data["test_subsets"] == ["evaluation"] and joined.test["held_out"] == \
        "the test split + subset 'evaluation'"
    test = joined.test
    assert test["tp"] + test["fn"] == sum(p["positives"] for p in parts.values())
    assert test["tp"] + test["fn"] + test["tn"] + test["fp"] == plain.test["tp"] + plain.test["fn"] + \
        plain.test["tn"] + plain.test["fp"] + 300
    # nothing chose or calibrated on it: validation and the threshold are what they were
    assert joined.shipping.threshold == plain.shipping.threshold
    assert joined.data["counts"]["val"] == plain.data["counts"]["val"]


def test_rerun_hits_the_cache_for_training_and_export(tiny_lake):
    run(tiny_lake)
    state = optimize(lake=str(tiny_lake), return_state=True, **FAST)
    states = task_states(state)
    assert "train:Cached" in states and "export-quantize:Cached" in states


def test_cross_fitting_calibrates_every_candidate_on_out_of_fold_scores_of_train_and_val(tiny_lake):
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.thresholds import ThresholdRule, calibrate

    state, registry = run(tiny_lake, calibrate_on="crossfit", folds=2, promote=False)
    states = task_states(state)
    assert states.count("train:Completed") + states.count("train:Cached") == 3  # the shipped model and 2 folds
    manifest = latest_manifest(registry)
    counts = make_split(Lake(tiny_lake)).counts
    calibration = manifest.shipping.calibration
    assert calibration["positives"] == counts["train"]["positives"] + counts["val"]["positives"]
    assert "cross-fit" in calibration["source"] and calibration["statement"].endswith("cross-fit over 2 folds")
    assert manifest.gates["calibrate_on"] == "crossfit" and manifest.gates["folds"] == 2
    # the threshold is the rule's rank on the out-of-fold scores, the same for every candidate
    (oof_file,) = Path(tiny_lake, "models", "work").glob("crossfit-*/oof.parquet")
    oof = pq.read_table(oof_file)
    assert sorted(set(oof.column("fold").to_pylist())) == [0, 1]
    expected = calibrate(oof.column("score").to_numpy().astype(np.float64), oof.column("label").to_numpy(),
                         ThresholdRule("pac", 0.98, 0.05)).threshold
    assert {c["threshold"] for c in manifest.candidates} == {expected} == {manifest.shipping.threshold}
    assert manifest.test["curve"][-1]["threshold"] == expected  # the test gate judges it on the shipped engine


def test_int8_failing_its_gate_ships_fp32_and_says_why(tiny_lake):
    _, registry = run(tiny_lake, **NO_INT8)
    manifest = latest_manifest(registry)
    assert manifest.shipping.candidate == "fp32" and manifest.shipping.precision == "fp32"
    int8 = [c for c in manifest.candidates if c["precision"] == "int8"]
    assert len(int8) == 4 and all(not c["passes"] and "more than -1.0 below FP32's" in c["why"] for c in int8)


def test_a_model_below_target_on_test_is_registered_not_promoted(tiny_lake, tmp_path):
    """Through the plain function: a threshold above every score misses every positive on test."""
    from prefect import task  # noqa: F401  (the flow's tasks import Prefect anyway)

    registry = Registry(Lake(tiny_lake))
    manifest = latest_manifest(registry)
    folder = registry.folder(manifest.version)
    export_dir, ckpt = fp32_export(folder, tmp_path)
    candidate = {**next(c for c in manifest.candidates if c["name"] == "fp32"), "threshold": 1.01}
    evaluation = {"candidates": [candidate], "ship": "fp32", "host": "test host"}
    from tasks.train import TrainSettings

    out = register_version(export_dir, ckpt, make_split(Lake(tiny_lake)), TrainSettings(epochs=99), GateSettings(),
                           evaluation)
    assert out.promoted is False and out.test["sensitivity"] == 0.0
    assert "NOT promoted" in out.promotion and "below the target 0.98" in out.promotion
    assert out.version in registry.versions()  # registered...
    promoted = registry.root / "PROMOTED"
    assert not promoted.exists() or registry.promoted() != out.version  # ...and never promoted


def test_gating_on_the_lower_bound_refuses_a_test_split_too_small_to_show_the_target(tiny_lake, tmp_path):
    """Every test positive found (threshold 0), but ~70 of them cannot show 98% at the exact lower bound."""
    registry = Registry(Lake(tiny_lake))
    manifest = latest_manifest(registry)
    folder = registry.folder(manifest.version)
    export_dir, ckpt = fp32_export(folder, tmp_path)
    candidate = {**next(c for c in manifest.candidates if c["name"] == "fp32"), "threshold": 0.0}
    evaluation = {"candidates": [candidate], "ship": "fp32", "host": "test host"}
    from tasks.train import TrainSettings

    split = make_split(Lake(tiny_lake))
    point = register_version(export_dir, ckpt, split, TrainSettings(epochs=98), GateSettings(), evaluation, False)
    bound = register_version(export_dir, ckpt, split, TrainSettings(epochs=97),
                             GateSettings(gate_on_lower_bound=True), evaluation, False)
    positives = split.counts["test"]["positives"]
    assert point.passed_gate and point.test["sensitivity"] == 1.0 and positives < 183
    assert not bound.passed_gate and bound.test["sensitivity_lower_bound"] < 0.98
    assert bound.test["positives_needed_for_bound"] == 183 and bound.test["gated_on"] == "lower bound"
    assert "the exact lower bound of test sensitivity (two-sided 95%)" in bound.promotion
    assert "the bound needs ≥ 183 test positives" in bound.promotion


def test_flow_fails_loudly_when_not_promoted(tiny_lake):
    # The old quantile rule with a negative margin calibrates for ~50% sensitivity on val: a threshold forced far too
    # high for the 0.98 target. FP32 ships (INT8 forced off).
    with pytest.raises(NotPromoted, match="below the target") as refused:
        optimize(lake=str(tiny_lake), threshold_rule="quantile", calibration_margin=-0.5, **NO_INT8,
                 **FAST)
    # what was registered travels with the refusal (the CLI prints its side-by-side before the one-line error)
    manifest = refused.value.manifest
    assert manifest.passed_gate is False and not manifest.promoted and manifest.version in str(refused.value)


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt.missing() is not None, reason=f"TensorRT cannot run here: {tensorrt.missing()}")
def test_on_a_gpu_tensorrt_ships_with_its_own_threshold_and_knee_and_onnxruntime_is_the_cpu_fallback(tiny_lake):
    import pyarrow.parquet as pq

    from flows.screen import screen
    from models.registry import host_fingerprint

    run(tiny_lake, engine="tensorrt")
    registry = Registry(Lake(tiny_lake))
    manifest = latest_manifest(registry)
    ship, fallback = manifest.shipping, manifest.fallback
    assert ship.engine == "tensorrt" and ship.candidate in ("trt-fp16", "trt-int8", "trt-fp32")
    assert next(c for c in manifest.candidates if c["name"] == ship.candidate)["threshold"] == ship.threshold
    assert fallback.engine == "onnxruntime" and fallback.passed_gate is not None
    assert {"model-fp16.onnx", "model-int8-trt.onnx"} <= set(manifest.files)
    assert host_fingerprint("tensorrt", ship.precision) in manifest.knees
    report = screen(lake=str(tiny_lake), version=manifest.version, engine="tensorrt")
    assert report.scored > 0
    engines = pq.read_table(tiny_lake / "predictions" / manifest.version, columns=["engine"]).column(0)
    assert set(engines.to_pylist()) == {"tensorrt"}
    assert registry.manifest(manifest.version).plans  # built once on this GPU, recorded with its hash
