"""The `optimize` flow: from the lake's labelled images to a fast, sensitivity-gated, registered engine."""

from __future__ import annotations

import time
from dataclasses import replace

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from models.engine import competing_engines, resolve_engine
from models.manifest import Manifest
from tasks.baseline import BASELINE_TRAINING, baseline_task
from tasks.dataset import SplitRef, make_split_task
from tasks.housekeeping import sweep_stale_temps_task
from tasks.lake import lake_root
from tasks.optimize import (GateSettings, evaluate_task, export_task, fold_splits_task, out_of_fold_task, register_task,
                            train_task)
from tasks.parity import side_by_side_markdown
from tasks.thresholds import CURVE_COLUMNS, curve_cells
from tasks.train import TrainSettings


class NotPromoted(RuntimeError):
    """The model was registered but not promoted (a held-out gate refused it); `manifest` is what was registered."""

    def __init__(self, message: str, manifest: Manifest | None = None) -> None:
        super().__init__(message)
        self.manifest = manifest


def curve_markdown(where: str, curve: list[dict]) -> str:
    """An operating curve as a Markdown table, the shipped threshold's row in bold."""
    lines = [f"operating curve on {where}:", "", "| " + " | ".join(CURVE_COLUMNS) + " |",
             "|" + "---|" * len(CURVE_COLUMNS)]
    for row in curve:
        cells = curve_cells(row)
        if row["at"] == "shipped":
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def runoff_cell(knee: dict) -> str:
    """A candidate's figure in the run-off among the closest (tasks/optimize.run_off), or a dash if it was not in it."""
    if "runoff" not in knee:
        return "–"
    return f"{knee['runoff']['images_per_s']:,.0f} ({knee['runoff']['share']:.2f})"


def parity_markdown(baseline: dict) -> str:
    """The side-by-side with the baseline and the non-inferiority verdicts, or why there is none."""
    if "skipped" in baseline:
        return f"\nbaseline: {baseline['skipped']}\n\n"
    ni = baseline["noninferiority"]
    return ("\n## against the baseline (same split, same export, same threshold rule)\n\n"
            + side_by_side_markdown(baseline["side_by_side"])
            + f"\nnon-inferiority (margin {ni['margin']}), val: {ni['val']['statement']}\n\n"
              f"held-out test: {ni['test']['statement']}\n\n")


def parity_lines(baseline: dict) -> list[str]:
    """The side-by-side for logs and the terminal: a line per model, then the verdicts."""
    if "skipped" in baseline:
        return [f"baseline: {baseline['skipped']}"]
    from tasks.parity import SIDE_BY_SIDE_COLUMNS, side_by_side_cells

    ni = baseline["noninferiority"]
    rows = baseline["side_by_side"]
    return ([" | ".join(SIDE_BY_SIDE_COLUMNS)] + [" | ".join(side_by_side_cells(r)) for r in rows]
            + [f"speed-up: {rows[0]['speedup_vs_baseline']:,.0f}× the baseline's images/s",
               f"non-inferiority (margin {ni['margin']}) on val: {ni['val']['statement']}",
               f"on the held-out test split: {ni['test']['statement']}"])


_TRAIN, _GATES = TrainSettings(), GateSettings()  # the defaults, defined once there


@flow(name="optimize")
def optimize(
    lake: str | None = None,
    epochs: int = _TRAIN.epochs,
    width: float = _TRAIN.width,
    depth: float = _TRAIN.depth,
    stem: str = _TRAIN.stem,
    arch: str = _TRAIN.arch,
    teacher: str | None = None,
    baseline: str | None = None,
    baseline_arch: str | None = None,
    spec_margin: float = _GATES.spec_margin,
    distill: bool = False,
    target_sensitivity: float = _GATES.target_sensitivity,
    threshold_rule: str = _GATES.threshold_rule,
    delta: float = _GATES.delta,
    calibration_margin: float = _GATES.calibration_margin,
    int8_auc_tolerance: float = _GATES.int8_auc_tolerance,
    gate_on_lower_bound: bool = _GATES.gate_on_lower_bound,
    calibrate_on: str = _GATES.calibrate_on,
    folds: int = _GATES.folds,
    seed: int = _TRAIN.seed,
    max_batch: int = _GATES.max_batch,
    knee_seconds: float = _GATES.knee_seconds,
    promote: bool = True,
    engine: str = "auto",
    test_subsets: list[str] | None = None,
) -> dict:
    """Train → export (BatchNorm folded) → quantize INT8 → per-engine threshold and knee → gates → register → promote.

    arch: screennet (default), or the seed's resnet18 (64→224) / resnet18-native for comparison.
    width, depth, stem: ScreenNet's width and depth multipliers and stem (models/nets.py; patch4 skips the 32×32
    stage; README "Performance" has the speed/quality front they trade along).
    teacher: a checkpoint to distil from (without a baseline). max_batch: top of the knee sweep (extended if the peak is there).
    knee_seconds: each sweep point's measuring time before it repeats until stable (tiny lakes in tests use less).
    threshold_rule: pac (default: the highest threshold whose sensitivity on new images is ≥ target with probability
    ≥ 1 − delta, tasks/thresholds.py) or quantile (target + calibration_margin on validation, no guarantee; kept for
    comparison). gate_on_lower_bound: promote only when the exact lower bound of held-out test sensitivity (the
    two-sided 95% interval's) reaches the target, not only its point estimate.
    calibrate_on: val (default: the rule on the validation split as each engine scores it; one training) or
    crossfit (the rule on the out-of-fold scores of `folds` models trained the same way on folds of train+val:
    `folds` times the positives, a higher threshold with the same guarantee, `folds` more trainings: ~1 hour on
    2 cores; the held-out test gate checks the threshold on the shipped engine).
    baseline: the model this replaces, evaluated like a candidate on the same split (tasks/baseline.py): a
    state_dict checkpoint (the seed's ResNet18; `baseline_arch` resnet18 with its 64→224 upsample, the default when
    the weights cannot say, or resnet18-native), or "train" (a ResNet18 at 64×64 trained here, ~15 min on 2 cores).
    With one, a candidate ships only if its specificity at the target sensitivity (matched, on the same images) is
    no worse than the baseline's by more than `spec_margin`, judged by the lower end of a paired bootstrap interval,
    on val (choosing) and on the held-out test split (promoting). distill: also distil the net from it (off by
    default: measured neutral to harmful when the baseline is not the stronger model; README: Clinical parity).
    promote: False registers without promoting (comparison runs, e.g. the seed's architecture).
    test_subsets: labelled audit subsets whose images join the held-out test split (a site's evaluation set enriched
    with positives, a benchmark's official test split): every held-out gate (sensitivity at the frozen threshold,
    non-inferiority to the baseline) then rests on their positives too. Nothing trains, chooses or calibrates on
    them, and a model already trained on the lake is reused.
    engine: auto (TensorRT where a GPU and the `gpu` extra are present; else the CPU engines compete, ONNX Runtime
    and OpenVINO, on the same graphs, and the fastest passing ships with an ONNX Runtime fallback), onnxruntime,
    openvino or tensorrt (alone; fails at once, saying what is missing, on a host that cannot run it).
    Ends Failed, with the version registered, when held-out test sensitivity is below target.
    """
    logger = get_run_logger()
    engines = competing_engines(engine)  # what competes for shipping on this host (fails here if it cannot run)
    engine = resolve_engine(engine)
    root = str(lake_root(lake))
    gates = replace(GateSettings(), target_sensitivity=target_sensitivity, threshold_rule=threshold_rule, delta=delta,
                    calibration_margin=calibration_margin, int8_auc_tolerance=int8_auc_tolerance, max_batch=max_batch,
                    knee_seconds=knee_seconds, gate_on_lower_bound=gate_on_lower_bound, calibrate_on=calibrate_on,
                    folds=folds,
                    spec_margin=spec_margin)
    gates.rule  # a bad rule, delta or calibration fails here, before the lake is read
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs {epochs!r}: give a whole number of epochs, at least 1")
    sweep_stale_temps_task(root)
    split: SplitRef = make_split_task(root, tuple(test_subsets or ()))
    logger.info("split %s: %s; held-out test: %s %s", split.sha256[:16], split.counts, split.held_out_description(),
                split.held_out)
    baseline_dir = teacher_arch = None
    if baseline:
        started = time.perf_counter()
        if baseline == "train":
            baseline_ckpt, baseline_arch = train_task(split, BASELINE_TRAINING), None
        else:
            baseline_ckpt = str(Path(baseline).expanduser().resolve())
            if not Path(baseline_ckpt).is_file():
                raise ValueError(f"baseline checkpoint {baseline} does not exist: pass a state_dict file, or "
                                 f"--baseline train")
        baseline_dir = baseline_task(baseline_ckpt, baseline_arch, split, gates, baseline)
        logger.info("baseline %s evaluated in %.1f min", baseline, (time.perf_counter() - started) / 60)
        if distill and teacher is None:
            teacher, teacher_arch = baseline_ckpt, baseline_arch
    settings = TrainSettings(arch=arch, width=width, depth=depth, stem=stem, epochs=epochs, seed=seed, teacher=teacher,
                             teacher_arch=teacher_arch)
    checkpoint = train_task(split, settings)
    oof_file = None
    if calibrate_on == "crossfit":
        folds_of = fold_splits_task(split, folds)
        started = time.perf_counter()
        checkpoints = [train_task(fold, settings) for fold in folds_of]
        oof_file = out_of_fold_task(split, folds_of, checkpoints)
        logger.info("cross-fit: %d fold models, %d out-of-fold positives, %.1f min", folds,
                    sum(f.counts["val"]["positives"] for f in folds_of), (time.perf_counter() - started) / 60)
    export_dir = export_task(checkpoint, split, gates, "tensorrt" if engine == "tensorrt" else "onnxruntime")
    logger.info("candidates compete on %s", ", ".join(engines))
    evaluation = evaluate_task(export_dir, split, gates, list(engines), oof_file, baseline_dir)
    manifest = register_task(export_dir, checkpoint, split, settings, gates, evaluation, promote, baseline_dir)

    ship, test = manifest.shipping, manifest.test
    knee = next(iter(manifest.knees.values()))
    create_markdown_artifact(
        key="optimize-summary",
        markdown=(
            f"# {manifest.version}\n\n"
            f"ships **{ship.engine} {ship.candidate}** at threshold {ship.threshold:.4f} ({ship.why})\n\n"
            f"| engine | candidate | val AUC | val sensitivity | images/s at knee | knee | run-off images/s (share) "
            f"| gate |\n"
            f"|---|---|---|---|---|---|---|---|\n"
            + "".join(
                f"| {c.get('engine', 'onnxruntime')} | {c['name']} | {c['val_auc']:.4f} | "
                f"{c['val_table']['sensitivity']:.4f} | "
                f"{c['knee']['images_per_s']:,.0f} | {c['knee']['batch']} | {runoff_cell(c['knee'])} | {c['why']} |\n"
                for c in manifest.candidates
            )
            + f"\nthreshold: {ship.calibration.get('statement', '')}\n\n"
            + curve_markdown("validation", manifest.candidate(ship.candidate)["curve"])
            + curve_markdown(f"held-out test: {test.get('held_out', 'the test split')} (threshold frozen)",
                             test["curve"])
            + parity_markdown(manifest.baseline)
            + f"\ntest: sensitivity {test['sensitivity']:.4f}, specificity {test['specificity']:.4f}, "
              f"AUC {test['auc']:.4f}\n\n{manifest.promotion}\n"
        ),
        description="optimize: candidates, gates, promotion",
    )
    logger.info("%s: %s; knee b=%d at %.0f images/s", manifest.version, manifest.promotion, knee["batch"],
                knee["images_per_s"])
    for line in parity_lines(manifest.baseline):
        logger.info("%s", line)
    if manifest.fallback:
        fb = manifest.fallback
        logger.info("fallback %s %s, threshold %.4f: %s", fb.engine, fb.candidate, fb.threshold, fb.verdict)
    if not manifest.passed_gate:
        raise NotPromoted(f"{manifest.version} registered but {manifest.promotion}", manifest)
    return {"version": manifest.version, "promoted": manifest.promoted, "shipping": ship.to_dict(), "test": test,
            "knee": knee, "baseline": manifest.baseline}
