"""Optimize's steps after training: export and quantize, evaluate each candidate engine, gate, register, promote.

Each step is a plain function (tests call them) wrapped by a Prefect task. Work products live under
`lake/models/work/<step>-<key>/`, named by a hash of their inputs, so a cached task's output is found again, and the
cache policy refuses to hit while that output is missing.

Candidates: FP32 ONNX and INT8 QDQ graphs (U8S8 and S8S8 activations, per-tensor and per-channel weights) on ONNX
Runtime; on a CPU host with OpenVINO, the same graphs on OpenVINO too ("ov-<name>"); with engine=tensorrt also
TensorRT plans (FP16 graph, symmetric INT8 Q/DQ graph, FP32). Each is scored on the validation split by its own
engine (INT8 and FP16 move scores, and two engines' INT8 kernels round differently), its threshold is calibrated
there, and its knee is measured on this host. A reduced-precision candidate ships only if its validation AUC is
within `int8_auc_tolerance` of FP32 and its threshold still reaches the target; the fastest passing candidate of the
competing engines ships (`choose`). When that is not ONNX Runtime (TensorRT, OpenVINO), the fastest passing ONNX
Runtime candidate is registered beside it as the `fallback` that hosts without that engine screen with, gated on
the test split in the same way. The shipped model is then checked once on the held-out test split with its
threshold frozen: below target, the version is registered but not promoted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger, task

from models.contract import TARGET_SENSITIVITY
from models.engine import (MAX_BATCH, Engine, OrtEngine, close_to_fastest, compiled_for, find_knee, runoff,
                           scores)
from models.manifest import Manifest, Shipped
from models.registry import Registry, host_fingerprint
from screenline.files import atomic_write_bytes, copy_atomic
from tasks.caching import IO_RETRIES, OutputCache, content_key, work_dir
from tasks.dataset import SplitRef, fold_split, load_split
from tasks.lake import Lake
from tasks.metrics import auc, exact_lower_bound, positives_needed, table_at
from tasks.parity import WHAT_TO_TRY, matched_specificity, noninferiority, side_by_side
from tasks.thresholds import ThresholdRule, calibrate, operating_curve
from tasks.train import TrainSettings


@dataclass(frozen=True)
class GateSettings:
    """What a model must reach to ship and to be promoted."""

    target_sensitivity: float = TARGET_SENSITIVITY
    threshold_rule: str = "pac"  # pac: sensitivity ≥ target with probability ≥ 1 − delta (tasks/thresholds.py)
    delta: float = 0.05
    calibration_margin: float = 0.01  # the old `quantile` rule's margin: target + margin on val, no guarantee
    int8_auc_tolerance: float = 0.005
    # (activation format, per-channel weights): all are built and measured; the fastest that passes ships
    int8_variants: tuple[tuple[str, bool], ...] = (("u8s8", False), ("u8s8", True), ("s8s8", False), ("s8s8", True))
    calibration_images: int = 512
    max_batch: int = MAX_BATCH
    knee_seconds: float = 0.3  # a knee sweep point's measuring time before it repeats to be stable (models/engine.py)
    gate_on_lower_bound: bool = False  # promote only if the exact lower bound of test sensitivity reaches the target
    calibrate_on: str = "val"  # the threshold rule on "val" (the validation split) or "crossfit" (out-of-fold scores)
    folds: int = 5  # crossfit: models trained the same way on folds of train+val, each scoring the fold it left out
    spec_margin: float = 0.03  # with a baseline: specificity at the target (matched) may be at most this much lower

    @property
    def rule(self) -> ThresholdRule:
        """How each candidate's threshold is chosen."""
        if self.calibrate_on not in CALIBRATE_ON:
            raise ValueError(f"calibrate_on must be one of {', '.join(CALIBRATE_ON)}, got {self.calibrate_on!r}")
        if self.calibrate_on == "crossfit" and self.folds < 2:
            raise ValueError(f"cross-fitting needs 2 or more folds, got {self.folds}")
        return ThresholdRule(self.threshold_rule, self.target_sensitivity, self.delta, self.calibration_margin)


CALIBRATE_ON = ("val", "crossfit")


@dataclass
class Candidate:
    """One engine/precision built from the trained model, and what it measured."""

    name: str  # "fp32" | "int8-<u8s8|s8s8>-<per-tensor|per-channel>" | "trt-<fp16|int8|fp32>"
    file: str
    precision: str
    engine: str = "onnxruntime"
    val_auc: float = float("nan")
    threshold: float = float("nan")
    calibration: dict = field(default_factory=dict)  # rule, delta, positives, rank, guarantee, statement
    val_table: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # the operating curve on val, the candidate's threshold marked
    knee: dict = field(default_factory=dict)
    noninferiority: dict = field(default_factory=dict)  # against the baseline on val, when there is one
    passes: bool = False
    why: str = ""


# --- train ---------------------------------------------------------------------------------------------------------


def train_output(inputs: dict[str, Any]) -> Path:
    split: SplitRef = inputs["split"]
    # the rows split by hash, not the held-out subsets: a model trains once whatever joins its test split
    return work_dir(split.lake_root, "train", split.training_sha256, inputs["settings"]) / "model.pt"


@task(name="train", cache_policy=OutputCache(namespace="train/v1", output=train_output), persist_result=True, **IO_RETRIES)
def train_task(split: SplitRef, settings: TrainSettings) -> str:
    """Train the net on the split (cached on the split's content hash and the settings)."""
    from tasks.train import train_model

    out = train_output({"split": split, "settings": settings})
    if out.exists():
        return str(out)
    return str(train_model(split, settings, out.parent, log=get_run_logger().info))


@task(name="fold-splits", **IO_RETRIES)
def fold_splits_task(split: SplitRef, folds: int) -> list[SplitRef]:
    """Cross-fitting's splits of train+val (the test split in none of them)."""
    return [fold_split(split, k, folds) for k in range(folds)]


def _oof_output(inputs: dict[str, Any]) -> Path:
    return work_dir(inputs["split"].lake_root, "crossfit", inputs["split"].sha256, inputs["checkpoints"]) / "oof.parquet"


@task(name="out-of-fold-scores", cache_policy=OutputCache(namespace="crossfit/v1", output=_oof_output),
      persist_result=True, **IO_RETRIES)
def out_of_fold_task(split: SplitRef, folds: list[SplitRef], checkpoints: list[str]) -> str:
    """Each fold model's scores of the fold it left out: as many calibration positives as train+val holds."""
    import pyarrow as pa

    from tasks.lake import write_table_atomic
    from tasks.train import load_checkpoint, predict

    out = _oof_output({"split": split, "checkpoints": checkpoints})
    parts = []
    for k, (fold, checkpoint) in enumerate(zip(folds, checkpoints)):
        x, y = load_split(fold, "val")
        parts.append(pa.table({"fold": pa.array(np.full(len(y), k), pa.int16()),
                               "score": pa.array(predict(load_checkpoint(Path(checkpoint)), x),
                                                 pa.float32()),
                               "label": pa.array(y, pa.int8())}))
    write_table_atomic(out, pa.concat_tables(parts))
    return str(out)


def architecture(checkpoint: Path, settings: TrainSettings, channels: int) -> dict[str, Any]:
    """What rebuilds the trained net: its name and, for ScreenNet, its whole ScreenNetConfig as trained."""
    from tasks.train import load_checkpoint

    config = getattr(load_checkpoint(checkpoint), "config", None)
    return {"name": settings.arch, "channels": channels, **settings.shape(),
            **(config.as_dict() if config is not None else {})}


# --- export and quantize -------------------------------------------------------------------------------------------


def export_and_quantize(checkpoint: Path, split: SplitRef, gates: GateSettings, out_dir: Path,
                        engine: str = "onnxruntime") -> dict[str, Any]:
    """FP32 ONNX (BatchNorm folded) with its parity against torch, and the INT8 QDQ graphs (plus, for TensorRT, the
    FP16 graph and the symmetric INT8 graph); returns a summary."""
    import onnx

    from models.export import OPSET, export_onnx
    from models.quantize import quantize_int8
    from tasks.train import load_checkpoint, predict

    model = load_checkpoint(checkpoint)
    fp32 = export_onnx(model, out_dir / "model-fp32.onnx", split.channels)
    x_val, _ = load_split(split, "val")
    probe = x_val[:256]
    parity = float(np.abs(scores(OrtEngine(fp32), probe) - predict(model, probe)).max())
    rng = np.random.default_rng(0)
    x_train, _ = load_split(split, "train")
    calibration = x_train[np.sort(rng.choice(len(x_train), min(gates.calibration_images, len(x_train)), False))]
    files = {"fp32": fp32.name}
    for fmt, per_channel in gates.int8_variants:
        name = f"int8-{fmt}-{'per-channel' if per_channel else 'per-tensor'}"
        files[name] = quantize_int8(fp32, out_dir / f"model-{name}.onnx", calibration, fmt, per_channel).name
    engines = dict.fromkeys(files, "onnxruntime")
    if engine == "tensorrt":
        from models.tensorrt import fp16_graph, int8_graph

        files["trt-fp16"] = fp16_graph(fp32, out_dir / "model-fp16.onnx").name
        files["trt-int8"] = int8_graph(fp32, out_dir / "model-int8-trt.onnx", calibration).name
        files["trt-fp32"] = fp32.name
        engines.update({"trt-fp16": "tensorrt", "trt-int8": "tensorrt", "trt-fp32": "tensorrt"})
    batchnorm_nodes = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(fp32)).graph.node)
    summary = {"files": files, "engines": engines, "fp32_max_abs_diff_vs_torch": parity, "opset": OPSET,
               "batchnorm_nodes": batchnorm_nodes}
    atomic_write_bytes(out_dir / "export.json", json.dumps(summary, indent=2).encode())  # last: marks the export done
    return summary


def _export_output(inputs: dict[str, Any]) -> Path:
    engine = inputs.get("engine", "onnxruntime")
    gates: GateSettings = inputs["gates"]  # only what export uses: a changed threshold rule re-uses the graphs
    parts = ((inputs["checkpoint"], gates.calibration_images, [list(v) for v in gates.int8_variants])
             + (() if engine == "onnxruntime" else (engine,)))
    return work_dir(inputs["split"].lake_root, "export", *parts) / "export.json"


@task(name="export-quantize", cache_policy=OutputCache(namespace="export/v1", output=_export_output), persist_result=True,
      **IO_RETRIES)
def export_task(checkpoint: str, split: SplitRef, gates: GateSettings, engine: str = "onnxruntime") -> str:
    """Export to ONNX and quantize to INT8 (and the TensorRT graphs); returns the folder holding the graphs."""
    out = _export_output({"checkpoint": checkpoint, "split": split, "gates": gates, "engine": engine})
    if not out.exists():
        export_and_quantize(Path(checkpoint), split, gates, out.parent, engine)
    return str(out.parent)


# --- evaluate: scores by each engine, threshold, knee, gates --------------------------------------------------------


def candidate_precision(name: str) -> str:
    """fp32 | int8 | fp16 from a candidate's name."""
    return name.removeprefix("trt-").removeprefix("ov-").split("-")[0]


def candidate_engine(path: Path, engine: str, precision: str, gates: GateSettings, channels: int,
                     lake_root: str) -> Engine:
    """An engine for one candidate graph: an ONNX Runtime session, an OpenVINO compiled model (the same graph), or a
    TensorRT plan (profile 1…max_batch, timing cache shared with the registry's plans)."""
    if engine == "openvino":
        from models.engine import OpenVinoEngine

        return OpenVinoEngine(path, precision)
    if engine != "tensorrt":
        return OrtEngine(path, precision)
    from models import tensorrt

    return tensorrt.engine_from_onnx(path, precision, channels, tensorrt.profile_for(None, gates.max_batch),
                                     Lake.at(lake_root).models / "tensorrt")


def _fastest_passing(candidates: list[Candidate], engines: tuple[str, ...]) -> Candidate | None:
    """The passing candidate of `engines` with the largest share in the run-off (`run_off`), where one was held;
    else, or among those it did not measure, the fastest by its own sweep."""
    passing = [c for c in candidates if c.passes and c.engine in engines]
    return max(passing, key=lambda c: (c.knee.get("runoff", {}).get("share", -1.0), c.knee["images_per_s"]),
               default=None)


def run_off(candidates: list[Candidate], engines: tuple[str, ...], make_engine, pixels: np.ndarray,
            seconds: float) -> list[str]:
    """Measure again, in turns (models/engine.runoff), the passing candidates within RUNOFF_MARGIN of the fastest of
    what may ship (the competing `engines`) and of what may fall back (ONNX Runtime), each at its own knee; their
    figures go in `knee["runoff"]`, and `choose` picks by them. `make_engine(candidate)` is a candidate's engine.
    Returns the names measured (none when fewer than two are that close: there is nothing to decide)."""
    contenders: dict[str, Candidate] = {}
    for pool in (engines, ("onnxruntime",)):
        passing = [c for c in candidates if c.passes and c.engine in pool]
        contenders |= {c.name: c for c in close_to_fastest(passing, lambda c: c.knee["images_per_s"])}
    if len(contenders) < 2:
        return []
    measured = runoff({name: (compiled_for(make_engine(c), c.knee["batch"]),
                              np.resize(pixels, (c.knee["batch"], *pixels.shape[1:])))
                       for name, c in contenders.items()}, seconds)
    for name, figures in measured.items():
        contenders[name].knee["runoff"] = figures
    return list(measured)


def choose(candidates: list[Candidate], engines: tuple[str, ...]) -> tuple[Candidate, Candidate | None]:
    """What ships and what every other host falls back to, from the candidates' measured figures and verdicts.

    Ships: the fastest (images/s at its knee, on this host; among those close enough to be measured again in turns,
    the fastest there: `run_off`) of the candidates of the competing `engines` that passed every gate; a faster
    one that failed one never ships. When none passed, the FP32 graph of the first engine (registered, and the
    held-out gate says whether it may screen). Fallback, when what ships is not ONNX Runtime (a TensorRT plan, an
    OpenVINO model): the fastest passing ONNX Runtime candidate (FP32 when none passed), which every host can run,
    gated on the test split in its own right."""
    ship = _fastest_passing(candidates, engines) or next(c for c in candidates if c.engine == engines[0]
                                                         and c.precision == "fp32")
    fallback = None
    if ship.engine != "onnxruntime":
        fallback = _fastest_passing(candidates, ("onnxruntime",)) or next(c for c in candidates if c.name == "fp32")
    return ship, fallback


def crossfit_calibration(oof_file: Path, gates: GateSettings) -> dict[str, Any]:
    """The rule on out-of-fold scores: one threshold for every candidate, with what it rests on."""
    import pyarrow.parquet as pq

    table = pq.read_table(oof_file)
    chosen = calibrate(table.column("score").to_numpy().astype(np.float64),
                       table.column("label").to_numpy().astype(np.int8), gates.rule).as_dict()
    chosen["source"] = (f"out-of-fold scores of {gates.folds} models trained the same way on folds of train+val "
                        f"(cross-fit): the guarantee is for models like the shipped one, not for it exactly; the "
                        f"held-out test split, seen by none of them, checks it")
    chosen["statement"] += f", cross-fit over {gates.folds} folds"
    return chosen


def evaluate_candidates(export_dir: Path, split: SplitRef, gates: GateSettings,
                        engines: tuple[str, ...] | str = ("onnxruntime",), oof_file: Path | None = None,
                        baseline_dir: Path | None = None) -> dict[str, Any]:
    """Score val with every candidate engine, calibrate its threshold (on val, or once on the out-of-fold scores of
    `oof_file`), measure its knee, apply the gates (with `baseline_dir`, non-inferiority to the baseline at matched
    sensitivity on val too); `choose` what ships among the competing `engines` (models/engine.competing_engines)
    and the ONNX Runtime fallback. With openvino among them, every ONNX graph is also a candidate on OpenVINO
    ("ov-<name>"): the same file, OpenVINO's own scores, threshold and knee."""
    from tasks.baseline import baseline_scores

    engines = (engines,) if isinstance(engines, str) else tuple(engines)
    summary = json.loads((export_dir / "export.json").read_text())
    x_val, y_val = load_split(split, "val")
    base_val = baseline_scores(baseline_dir, "val")[0] if baseline_dir is not None else None
    crossfit = crossfit_calibration(oof_file, gates) if oof_file is not None else None
    plan = [(name, file, summary.get("engines", {}).get(name, "onnxruntime")) for name, file in summary["files"].items()]
    if "openvino" in engines:
        plan += [(f"ov-{name}", file, "openvino") for name, file, kind in plan if kind == "onnxruntime"]
    # TensorRT plans are kept for the run-off (one takes long to build again); a CPU engine is made again there (an
    # ONNX Runtime session in milliseconds, OpenVINO compiled for the knee anyway), so ~10 of them (tens of MB each)
    # are not all alive at once.
    candidates, plans = [], {}

    def engine_of(name: str, file: str, kind: str) -> Engine:
        if name in plans:
            return plans[name]
        return candidate_engine(export_dir / file, kind, candidate_precision(name), gates, split.channels,
                                split.lake_root)

    for name, file, kind in plan:
        runner = engine_of(name, file, kind)
        if kind == "tensorrt":
            plans[name] = runner
        s = scores(runner, x_val)
        c = Candidate(name, file, runner.precision, kind, val_auc=auc(s, y_val))
        c.calibration = dict(crossfit) if crossfit else {**calibrate(s, y_val, gates.rule).as_dict(),
                                                         "source": "the validation split, scored by this engine"}
        c.threshold = c.calibration["threshold"]
        c.val_table = table_at(s, y_val, c.threshold).as_dict()
        c.curve = operating_curve(s, y_val, shipped=c.threshold)
        c.knee = find_knee(runner, x_val[:1024], max_batch=gates.max_batch,
                           seconds_per_point=gates.knee_seconds).as_dict()
        if base_val is not None:
            c.noninferiority = noninferiority(s, base_val, y_val, gates.target_sensitivity, gates.spec_margin)
        candidates.append(c)
    fp32 = next(c for c in candidates if c.name == "fp32")
    for c in candidates:
        sens = c.val_table["sensitivity"]
        if sens < gates.target_sensitivity:
            c.why = f"val sensitivity {sens:.4f} below target {gates.target_sensitivity}"
        elif c.precision != "fp32" and fp32.val_auc - c.val_auc > gates.int8_auc_tolerance:
            c.why = f"val AUC {c.val_auc:.4f} is more than {gates.int8_auc_tolerance} below FP32's {fp32.val_auc:.4f}"
        else:
            c.passes, c.why = True, "passes"
    _choose_on_noninferiority([c for c in candidates if c.passes])
    del runner  # the last candidate's too: the run-off makes what it measures
    run_off(candidates, engines, lambda c: engine_of(c.name, c.file, c.engine), x_val[:1024],
            seconds=gates.knee_seconds * 2 / 3)
    ship, fallback = choose(candidates, engines)
    return {"candidates": [asdict(c) for c in candidates], "ship": ship.name,
            "fallback": fallback.name if fallback else None, "engines": list(engines),
            "host": host_fingerprint(ship.engine, ship.precision)}


def _choose_on_noninferiority(candidates: list[Candidate]) -> None:
    """Non-inferiority to the baseline on val chooses among the candidates that passed the other gates: those shown
    non-inferior, when any is. When none is (the same model at every precision, so usually all or none), it cannot
    choose, and says so; the held-out test split then decides promotion. Refusing them all would only ship the
    slowest graph of a model that the test gate refuses or promotes either way."""
    judged = [c for c in candidates if c.noninferiority]
    if not judged:
        return
    if any(c.noninferiority["passes"] for c in judged):
        for c in judged:
            if not c.noninferiority["passes"]:
                c.passes, c.why = False, f"val, against the baseline: {c.noninferiority['statement']}"
        return
    for c in judged:
        c.why = ("passes; no candidate was shown non-inferior to the baseline on val (so it did not choose; the "
                 f"held-out test split decides promotion): {c.noninferiority['statement']}")


# --- register, test gate, promote ----------------------------------------------------------------------------------


def write_reference_scores(folder: Path, engine: Engine, split: SplitRef, threshold: float) -> dict[str, Any]:
    """The shipped engine's validation scores and labels, written beside the model: audit's drift reference."""
    import pyarrow as pa

    from tasks.audit import REFERENCE_FILE
    from tasks.lake import write_table_atomic

    x_val, y_val = load_split(split, "val")
    s = scores(engine, x_val)
    write_table_atomic(folder / REFERENCE_FILE, pa.table({"score": pa.array(s, pa.float32()),
                                                          "label": pa.array(y_val.astype(np.int8))}))
    return {"file": REFERENCE_FILE, "split": "val", "n": int(len(s)),
            "positive_rate": float(np.mean(s >= threshold)), "mean_score": float(np.mean(s))}


def _gate_on_test(candidate: dict[str, Any], gates: GateSettings, test_scores: np.ndarray,
                  y_test: np.ndarray) -> dict[str, Any]:
    """A shipped candidate with its held-out test figures at its frozen threshold, and whether it reaches the target:
    its point estimate, or (gate_on_lower_bound) the exact lower bound of the two-sided 95% interval."""
    table = table_at(test_scores, y_test, candidate["threshold"]).as_dict()  # threshold frozen before this
    positives = table["tp"] + table["fn"]
    low = exact_lower_bound(table["tp"], positives)
    needed = positives_needed(gates.target_sensitivity, table["fn"]) if positives else 0
    figure = low if gates.gate_on_lower_bound else table["sensitivity"]
    passed = figure >= gates.target_sensitivity
    what = ("the exact lower bound of test sensitivity (two-sided 95%)" if gates.gate_on_lower_bound
            else "test sensitivity")
    return {
        "engine": candidate.get("engine", "onnxruntime"), "candidate": candidate["name"],
        "precision": candidate["precision"], "file": candidate["file"], "threshold": candidate["threshold"],
        "calibration": candidate.get("calibration", {}), "why": candidate["why"],
        "test": {"auc": auc(test_scores, y_test), **table, "sensitivity_lower_bound": low,
                 "positives_needed_for_bound": needed, "gated_on": "lower bound" if gates.gate_on_lower_bound
                 else "point estimate",
                 "curve": operating_curve(test_scores, y_test, shipped=candidate["threshold"])},
        "passed_gate": passed,
        "verdict": (
            f"{what} {figure:.4f} ({table['tp']}/{positives}; 95% CI {table['sensitivity_ci95'][0]:.4f}–"
            f"{table['sensitivity_ci95'][1]:.4f}) at the frozen threshold reaches the target "
            f"{gates.target_sensitivity}" if passed else
            f"{what} {figure:.4f} ({table['tp']}/{positives}) at the frozen threshold {candidate['threshold']:.4f} "
            f"is below the target {gates.target_sensitivity}"
            + (f": with {table['fn']} miss(es) the bound needs ≥ {needed} test positives" if gates.gate_on_lower_bound
               else "")
            + "; train longer or on more positives, or calibrate with a smaller delta (a lower, more conservative "
              "threshold)"
        ),
    }


PARITY_SCORES = "parity-scores.parquet"


def _against_baseline(baseline_dir: Path, folder: Path, ship: dict[str, Any], runner: Engine, split: SplitRef,
                      gates: GateSettings, ship_test: np.ndarray, y_test: np.ndarray,
                      test: dict[str, Any]) -> tuple[dict[str, Any], bool, str]:
    """The baseline's record for the manifest (its figures, the side-by-side, non-inferiority on val and test), and
    the held-out verdict. Both models' val and test scores are written beside the model so every figure can be
    recomputed."""
    import pyarrow as pa

    from tasks.baseline import baseline_scores
    from tasks.lake import write_table_atomic

    summary = json.loads((baseline_dir / "baseline.json").read_text())
    base_val, y_val = baseline_scores(baseline_dir, "val")
    base_test, y_base_test = baseline_scores(baseline_dir, "test")
    if not np.array_equal(y_base_test, y_test):
        raise ValueError(f"the baseline in {baseline_dir} was scored on other images than this split's")
    x_val, _ = load_split(split, "val")
    ship_val = scores(runner, x_val)
    write_table_atomic(folder / PARITY_SCORES, pa.table({
        "split": ["val"] * len(y_val) + ["test"] * len(y_test),
        "label": pa.array(np.concatenate([y_val, y_test]).astype(np.int8)),
        "candidate": pa.array(np.concatenate([ship_val, ship_test]), pa.float32()),
        "baseline": pa.array(np.concatenate([base_val, base_test]), pa.float32())}))
    target = gates.target_sensitivity
    on_test = noninferiority(ship_test, base_test, y_test, target, gates.spec_margin)
    rows = side_by_side(
        {"name": f"{ship.get('engine', 'onnxruntime')} {ship['name']} (ships)", "val_auc": auc(ship_val, y_val),
         "test_auc": test["auc"], "val_matched": matched_specificity(ship_val, y_val, target),
         "test_matched": on_test["candidate_specificity"], "threshold": ship["threshold"], "test": test,
         "knee": ship["knee"]},
        {"name": f"baseline {summary['arch']}", "val_auc": summary["val"]["auc"], "test_auc": summary["test"]["auc"],
         "val_matched": summary["val"]["specificity_at_target"],
         "test_matched": summary["test"]["specificity_at_target"], "threshold": summary["threshold"],
         "test": summary["test"], "knee": summary["knee"]},
        target)
    record = {**summary, "side_by_side": rows, "scores_file": PARITY_SCORES,
              "noninferiority": {"margin": gates.spec_margin, "val": ship.get("noninferiority") or
                                 noninferiority(ship_val, base_val, y_val, target, gates.spec_margin),
                                 "test": on_test}}
    verdict = (f"held-out test against the baseline: {on_test['statement']}" if on_test["passes"] else
               f"held-out test against the baseline: {on_test['statement']}; try: {WHAT_TO_TRY}")
    return record, on_test["passes"], verdict


def register_version(export_dir: Path, checkpoint: Path, split: SplitRef, settings: TrainSettings,
                     gates: GateSettings, evaluation: dict[str, Any], promote: bool = True,
                     baseline_dir: Path | None = None) -> Manifest:
    """Copy the graphs into lake/models/<version>/, freeze the shipping threshold, test it, write the manifest,
    and promote when held-out test sensitivity reaches the target (and, with a baseline, the shipped engine is
    non-inferior to it on test at matched sensitivity) and `promote`. Returns the manifest.

    When TensorRT or OpenVINO ships, the ONNX Runtime fallback is tested the same way and recorded as `fallback`;
    hosts that cannot run what ships screen with it only if it passed too."""
    lake = Lake.at(split.lake_root)
    registry = Registry(lake)
    by_name = {c["name"]: c for c in evaluation["candidates"]}
    ship = by_name[evaluation["ship"]]
    engine = ship.get("engine", "onnxruntime")
    # a TensorRT (or OpenVINO) optimize registers a version of its own, so an ONNX Runtime version is never rewritten
    extra = () if engine == "onnxruntime" else (engine,)
    if baseline_dir is not None:
        extra += (json.loads((baseline_dir / "baseline.json").read_text())["checkpoint_sha256"],)
    version = "sn-" + content_key("version", split.sha256, settings, gates, checkpoint, *extra)[:12]
    folder = registry.folder(version)
    folder.mkdir(parents=True, exist_ok=True)
    export = json.loads((export_dir / "export.json").read_text())
    for file in export["files"].values():
        copy_atomic(export_dir / file, folder / file)  # a re-registration never rewrites a file in use in place
    copy_atomic(checkpoint, folder / "model.pt")
    copy_atomic(checkpoint.parent / "model.json", folder / "model.json")

    def runner(c: dict[str, Any]) -> Engine:
        return candidate_engine(folder / c["file"], c.get("engine", "onnxruntime"), c["precision"], gates,
                                split.channels, split.lake_root)

    shipped_runner = runner(ship)
    reference = write_reference_scores(folder, shipped_runner, split, ship["threshold"])
    x_test, y_test = load_split(split, "test")
    ship_test = scores(shipped_runner, x_test)
    shipping = _gate_on_test(ship, gates, ship_test, y_test)
    fallback = None
    if evaluation.get("fallback"):
        fb_runner = runner(by_name[evaluation["fallback"]])
        fallback = _gate_on_test(by_name[evaluation["fallback"]], gates, scores(fb_runner, x_test), y_test)
    passed = shipping.pop("passed_gate")
    test = {**shipping.pop("test"), "held_out": split.held_out_description(), "parts": split.held_out}
    verdict = shipping.pop("verdict")
    baseline = {"skipped": "no baseline given (optimize --baseline CKPT|train): the non-inferiority gate was not "
                           "applied"}
    if baseline_dir is not None:
        baseline, parity_passed, parity_verdict = _against_baseline(
            baseline_dir, folder, ship, shipped_runner, split, gates, ship_test, y_test, test)
        if not parity_passed:
            verdict = parity_verdict if passed else f"{verdict}; and {parity_verdict}"
            passed = False
        else:
            verdict += f"; {parity_verdict}"
    promoted = passed and promote
    knees = {evaluation["host"]: ship["knee"]}
    if fallback:
        knees[host_fingerprint("onnxruntime", fallback["precision"])] = by_name[fallback["candidate"]]["knee"]
    meta = json.loads((checkpoint.parent / "model.json").read_text())
    manifest = Manifest(
        architecture=architecture(checkpoint, settings, split.channels),
        data={"split_sha256": split.sha256, "split_file": Path(split.path).name, "counts": split.counts,
              "training_sha256": split.training_sha256, "test_subsets": list(split.test_subsets),
              "held_out": split.held_out},
        training={"settings": settings.as_dict(), "history": meta["history"], "best_val_auc": meta["val_auc"]},
        export={"fp32_max_abs_diff_vs_torch": export["fp32_max_abs_diff_vs_torch"], "opset": export["opset"],
                # counted in the FP32 graph, not assumed (ScreenNet's are folded by fold_batchnorm, a ResNet18's
                # by the exporter's constant folding; an export without the count predates it)
                "batchnorm_folded": export["batchnorm_nodes"] == 0 if "batchnorm_nodes" in export else None},
        gates=asdict(gates),
        candidates=evaluation["candidates"],
        knees=knees,
        shipping=Shipped.from_dict(shipping, "the shipped candidate"),
        fallback=Shipped.from_dict(fallback, "the fallback candidate") if fallback else None,
        test=test,
        reference=reference,
        baseline=baseline,
        promoted=promoted,
        passed_gate=passed,
        promotion=(verdict + ("" if promote else "; not promoted: registered for comparison only") if passed else
                   f"NOT promoted: {verdict}"),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    manifest = registry.register(version, manifest)
    if promoted:
        registry.promote(version)
    return manifest


@task(name="evaluate", **IO_RETRIES)
def evaluate_task(export_dir: str, split: SplitRef, gates: GateSettings, engines: list[str] | None = None,
                  oof_file: str | None = None, baseline_dir: str | None = None) -> dict:
    """Scores, thresholds and knees of every candidate engine on this host; what ships among `engines`."""
    return evaluate_candidates(Path(export_dir), split, gates, tuple(engines or ("onnxruntime",)),
                               Path(oof_file) if oof_file else None,
                               Path(baseline_dir) if baseline_dir else None)


@task(name="register", **IO_RETRIES)
def register_task(export_dir: str, checkpoint: str, split: SplitRef, settings: TrainSettings, gates: GateSettings,
                  evaluation: dict, promote: bool = True, baseline_dir: str | None = None) -> Manifest:
    """Register the version, gate it on held-out test sensitivity (and non-inferiority to the baseline), promote it
    if it passes."""
    return register_version(Path(export_dir), Path(checkpoint), split, settings, gates, evaluation, promote,
                            Path(baseline_dir) if baseline_dir else None)
