"""`screenline`: the command line over the flows.

    screenline samples [--out samples]            write a generated sample set of shards
    screenline ingest PATH_OR_GLOB... [--lake]    land shards in the lake
    screenline optimize [--lake] [--epochs N]     train, export, quantize, calibrate, gate, register, promote
    screenline models [--lake]                    list registered model versions, and whether each is trusted
    screenline sign VERSION [--lake]              re-sign a manifest you changed by hand (needs the signing key)
    screenline promote VERSION [--lake]           make a version that passed its gate the one screening uses
    screenline screen [--lake] [--dask ADDR|local] score every image with the promoted model at the knee
    screenline results [--version|--run-id|--since] [--out F]   predictions joined with shard and source
    screenline audit [--lake] [--subset S]        sensitivity on labelled subsets with intervals, drift, a report
    screenline calibrate --subset S [--apply]     a site threshold, chosen on half a labelled subset, verified
    screenline nightly [--inbox DIR] [--lake]     inbox → ingest → screen → audit, one run, one report
    screenline demo                               samples → ingest → optimize → nightly on an embedded default

The lake is `--lake`, else $SCREENLINE_LAKE, else ./lake. Flows run in Prefect's ephemeral mode unless
PREFECT_API_URL points at a server. Exit status: 0 done (an audit passed), 2 an error or a failed audit, 3 an audit
that could not show the target (inconclusive, or no labelled subset to audit).

An error is one line on stderr, `screenline: error: ...`, saying what to do: Prefect's log lines stay, its
tracebacks do not (the flow run in the Prefect UI keeps them). SCREENLINE_TRACEBACKS=1 shows them, and a traceback
for an error screenline did not foresee.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Prefect's ephemeral server needs longer than its 20 s default to start on a loaded 2-core machine. Only defaults:
# a user's own Prefect settings win.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class CliError(Exception):
    """A one-line error for the user: printed without a traceback; the process exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


NOT_SHOWN = 3
"""Exit status of an audit (or a night) that could not show the sensitivity target: not a pass, not a failure."""


def _predictions_dir(lake: str, version: str) -> Path:
    from tasks.lake import Lake

    return Lake.at(lake).predictions_dir(version)


def _lake_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", help="lake root (default: $SCREENLINE_LAKE or ./lake)")


TRACEBACKS_ENV = "SCREENLINE_TRACEBACKS"


def _tracebacks() -> bool:
    return os.environ.get(TRACEBACKS_ENV, "") not in ("", "0")


class _WithoutTraceback:
    """A console formatter's output without the traceback a record carries (the record itself is left whole, for
    the handlers that ship it to the Prefect server)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def format(self, record) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _one_line_errors() -> None:
    """Prefect's console handlers print its log lines without tracebacks (the error that follows is one line)."""
    if _tracebacks():
        return
    import logging

    import prefect.main  # noqa: F401 (configures Prefect's logging, as any flow import does)
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))


def _check_lake(lake: str | None) -> None:
    """A lake path that cannot be one (a file, an unwritable folder) is one line before any flow starts."""
    from tasks.lake import lake_root

    root = lake_root(lake)
    if root.exists() and not root.is_dir():
        raise CliError(f"the lake {root} is a file, not a folder: pass --lake a folder (or a path to create)")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"the lake {root} cannot be written by this user ({existing} is not writable): pass --lake a "
                       f"folder you can write, or fix its permissions")


def _engine_arg(parser: argparse.ArgumentParser) -> None:
    from models.engine import ENGINES

    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="auto (default): TensorRT on a host with an NVIDIA GPU and the `gpu` extra, else the "
                             "fastest CPU engine (OpenVINO or ONNX Runtime; optimize lets them compete)")


def _print_ingest(report: "object", seconds: float) -> None:
    from flows.ingest import IngestReport

    assert isinstance(report, IngestReport)
    width = max((len(Path(s.shard).name) for s in report.shards), default=5)
    print(f"\n{'shard':<{width}}  {'status':<15} {'accepted':>8} {'rejected':>8}  reasons")
    for s in report.shards:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.reasons.items())) or "-"
        print(f"{Path(s.shard).name:<{width}}  {s.status:<15} {s.accepted:>8} {s.rejected:>8}  {reasons}")
    rate = report.landed / seconds if seconds > 0 else 0.0
    print(
        f"\nlake: {report.lake}  ({report.channels} channel(s))\n"
        f"accepted {report.accepted} image(s) ({report.landed} new, {report.accepted - report.landed} already in "
        f"the lake), rejected {report.rejected} entr(ies); {seconds:.1f} s, {rate:,.0f} new images/s\n"
        f"  images:  {report.lake}/images/\n  rejects: {report.lake}/rejects/"
    )


def cmd_samples(args: argparse.Namespace) -> None:
    from tasks.samples import make_samples

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CliError(f"{out} is not empty; pass --force to write the sample set there anyway")
    t0 = time.perf_counter()
    made = make_samples(out, n=args.n, prevalence=args.prevalence, seed=args.seed, defects=not args.no_defects)
    print(
        f"wrote {made.images} images ({made.positives} positive) in {time.perf_counter() - t0:.1f} s to {out}/\n"
        f"  train:   {', '.join(p.name for p in made.train)}\n"
        f"  holdout: {', '.join(p.name for p in made.holdout)}  (ingest with --subset holdout)\n"
        f"  inbox:   {', '.join(p.name for p in made.inbox)}  (unlabelled)\n"
        f"  extras:  {', '.join(p.name for p in made.extras)}  (a fainter site that fails an audit, a dimmer night "
        f"that drifts, a newer scanner for site calibration, an evaluation set for optimize --test-subset)\n"
        f"  defects: {made.defects} bad entries in {made.train[0].name}/ to show the reject path"
    )


def run_ingest(shards: list[str], lake: str | None, **options: object) -> "object":
    """Run the ingest flow and print its summary; one-line errors for paths that match nothing."""
    from flows.ingest import ingest
    from tasks.shards import ShardNotFound, find_shards

    try:
        find_shards(shards)  # fail fast, before starting Prefect
    except ShardNotFound as exc:
        raise CliError(str(exc)) from None
    t0 = time.perf_counter()
    try:
        report = ingest(shards=shards, lake=lake, **options)
    except (ValueError, RuntimeError) as exc:  # the flow's own errors say what to do; Prefect logged the rest
        raise CliError(str(exc)) from None
    _print_ingest(report, time.perf_counter() - t0)
    return report


def cmd_ingest(args: argparse.Namespace) -> None:
    from screenline.files import UnsafePath
    from tasks.lake import Lake

    for shard_id in args.replace or []:  # a shard to replace must be there: one line, before Prefect starts
        try:
            exists = Lake.at(args.lake).image_file(shard_id).exists()
        except UnsafePath as exc:
            raise CliError(f"--replace {shard_id}: {exc}") from None
        if not exists:
            raise CliError(f"--replace {shard_id}: no such shard in {Lake.at(args.lake).root} (lake/images/ and "
                           f"`screenline results` name the shards)")
    run_ingest(args.shards, args.lake, channels=args.channels, resize=args.resize, subset=args.subset,
               test_subset=args.test_subset, replace=args.replace)


def run_optimize(lake: str | None, **params: object) -> dict:
    """Run the optimize flow and print what ships; one-line errors for an empty lake or a failed gate."""
    from flows.optimize import NotPromoted, optimize

    _check_engine(str(params.get("engine", "auto")))
    try:
        result = optimize(lake=lake, **params)
    except NotPromoted as exc:
        print_parity(exc.manifest.baseline if exc.manifest else {})  # the side-by-side that refused it, then the line
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    ship, test, knee = result["shipping"], result["test"], result["knee"]
    print(
        f"\n{'promoted' if result['promoted'] else 'registered (not promoted)'} {result['version']}: "
        f"{ship['engine']} {ship['candidate']}, threshold {ship['threshold']:.4f}\n"
        f"  threshold rule: {ship.get('calibration', {}).get('statement', '?')}\n"
        f"  held-out test{_held_out(test)}: sensitivity {test['sensitivity']:.4f} (95% CI "
        f"{test['sensitivity_ci95'][0]:.4f}–"
        f"{test['sensitivity_ci95'][1]:.4f}), specificity {test['specificity']:.4f}, AUC {test['auc']:.4f}\n"
        f"  this host: knee batch {knee['batch']}, {knee['images_per_s']:,.0f} images/s, "
        f"batch-1 latency {knee['batch1_latency_ms']:.3f} ms{_fit(knee)}"
    )
    if test.get("curve"):
        print_curve("  operating curve on the held-out test split (threshold frozen):", test["curve"])
    print_parity(result.get("baseline") or {})
    return result


def _fit(knee: dict) -> str:
    """The knee's fit, where the manifest records one (knees measured before 2026-12-02 do not)."""
    fit = knee.get("fit") or {}
    if not {"call_ms", "image_ms"} <= fit.keys():
        return ""
    return f" (a call {fit['call_ms']:.3f} ms + {fit['image_ms']:.4f} ms an image)"


def _held_out(test: dict) -> str:
    """" (the test split + subset 'x': N images, P positive)" when subsets joined the held-out test split."""
    if not test.get("parts") or len(test["parts"]) < 2:
        return ""
    return (f" ({test['held_out']}: " + ", ".join(f"{name} {c['images']:,} images, {c['positives']:,} positive"
                                                 for name, c in test["parts"].items()) + ")")


def print_parity(baseline: dict) -> None:
    """The side-by-side with the baseline (or why there is none), as optimize and `models` show it."""
    from flows.optimize import parity_lines

    if not baseline:
        return
    lines = parity_lines(baseline)
    print("  " + ("against the baseline, same split (specificity at the target sensitivity, each model at its "
                  "own threshold reaching it):" if "skipped" not in baseline else lines.pop(0)))
    for line in lines:
        print("    " + line)


def print_curve(title: str, curve: list[dict]) -> None:
    """An operating curve as a text table, the shipped threshold's row marked."""
    from tasks.thresholds import CURVE_COLUMNS, curve_cells

    widths = [14, 9, 11, 11, 34]
    print(title)
    print("    " + "  ".join(f"{c:>{w}}" for c, w in zip(CURVE_COLUMNS, widths)))
    for row in curve:
        cells = curve_cells(row)
        mark = "  ← shipped" if row["at"] == "shipped" else ""
        print("    " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + mark)


def _check_engine(engine: str) -> str:
    """The engine this host will use for `engine`; one line, before any flow starts, when it cannot run here."""
    from models.engine import EngineUnavailable, resolve_engine
    from models.tensorrt import TensorRTUnavailable

    try:
        return resolve_engine(engine)
    except (TensorRTUnavailable, EngineUnavailable, ValueError) as exc:
        raise CliError(str(exc)) from None


def _check_baseline(baseline: str | None, arch: str | None) -> None:
    """A baseline checkpoint that cannot be loaded safely fails in one line, before any flow starts."""
    if baseline is None or baseline == "train":
        return
    if not Path(baseline).expanduser().is_file():  # before importing torch to load it
        raise CliError(f"baseline checkpoint {baseline} does not exist: pass a state_dict file, or --baseline train")
    from models.baseline import BaselineError, load_baseline

    try:
        load_baseline(Path(baseline), arch)
    except BaselineError as exc:
        raise CliError(str(exc)) from None


OPTIMIZE_EXTRA = "torch, torchvision and onnxscript"


def _check_optimize_extra() -> None:
    """Training needs the `optimize` extra; a screening worker installed without it says so in one line. Looked up,
    not imported (importing torch takes seconds, and the flow imports it anyway), so a bad invocation fails at once."""
    from importlib.util import find_spec

    def absent(name: str) -> bool:
        try:
            return find_spec(name) is None
        except ImportError:
            return True

    missing = next((name for name in ("torch", "torchvision", "onnxscript") if absent(name)), None)
    if missing:
        raise CliError(f"screenline optimize needs the `optimize` extra ({OPTIMIZE_EXTRA}; missing: {missing}): "
                       f"pip install '.[optimize]' in the checkout (this install can ingest, screen, audit and run nightly)")


def _check_test_subsets(lake: str | None, names: list[str] | None) -> None:
    """A held-out subset the lake does not hold (or that lacks positives or negatives) fails in one line, before any
    flow starts."""
    if not names:
        return
    from tasks.dataset import held_out_images
    from tasks.lake import Lake

    try:
        held_out_images(Lake.at(lake), names)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_optimize(args: argparse.Namespace) -> None:
    _check_optimize_extra()
    _check_baseline(args.baseline, args.baseline_arch)
    _check_test_subsets(args.lake, args.test_subsets)
    params = {k: v for k, v in vars(args).items() if k in ("epochs", "width", "depth", "stem", "arch", "teacher", "engine",
                                                          "target_sensitivity", "threshold_rule", "delta", "seed",
                                                          "gate_on_lower_bound", "calibrate_on", "folds",
                                                          "baseline", "baseline_arch", "spec_margin", "distill",
                                                          "promote", "test_subsets")}
    run_optimize(args.lake, **params)


def cmd_models(args: argparse.Namespace) -> None:
    from models.registry import ManifestTooNew, ModelIntegrityError, ModelNotFound, Registry
    from tasks.lake import Lake

    registry = Registry(Lake.at(args.lake))
    versions = registry.versions()
    if not versions:
        raise CliError(f"no models in {registry.root}: run `screenline optimize` to make one")
    try:
        promoted = registry.promoted()
    except ModelNotFound:
        promoted = None
    except (ModelIntegrityError, ManifestTooNew) as exc:
        promoted = None
        print(f"warning: {exc}", file=sys.stderr)
    print(f"{'version':<16} {'promoted':<8} {'ships':<21} {'threshold':>9} {'test sens':>9} {'test AUC':>8}  "
          f"{'gate':<6} {'trust':<9} registered")
    untrusted = []
    for version in versions:
        m = registry.read_manifest(version)
        try:
            registry.manifest(version)
            trust = "signed"
        except (ModelIntegrityError, ManifestTooNew) as exc:
            trust = "UNTRUSTED" if isinstance(exc, ModelIntegrityError) else "too new"
            untrusted.append(f"{version}: {exc}")
        ship, test = m.get("shipping", {}), m.get("test", {})
        mark = "*" if version == promoted else ("no" if not m.get("promoted") else "yes")
        gate = {True: "passed", False: "FAILED"}.get(m.get("passed_gate"), "none")
        print(f"{version:<16} {mark:<8} {ship.get('candidate', '?'):<21} {ship.get('threshold', float('nan')):>9.4f} "
              f"{test.get('sensitivity', float('nan')):>9.4f} {test.get('auc', float('nan')):>8.4f}  "
              f"{gate:<6} {trust:<9} {m.get('registered_at', '?')}")
    for line in untrusted:
        print(f"untrusted: {line}", file=sys.stderr)
    shown = args.version or promoted
    if shown:
        m = registry.read_manifest(shown)
        ship = m.get("shipping", {})
        candidate = next((c for c in m.get("candidates", []) if c["name"] == ship.get("candidate")), {})
        print(f"\n{shown} ships {ship.get('engine')} {ship.get('candidate')} at threshold "
              f"{ship.get('threshold', float('nan')):.4f}: {ship.get('calibration', {}).get('statement', 'no rule recorded')}")
        if candidate.get("curve"):
            print_curve("  operating curve on validation:", candidate["curve"])
        if m.get("test", {}).get("curve"):
            print_curve(f"  on the held-out test split{_held_out(m['test'])} (threshold frozen):", m["test"]["curve"])
        print_parity(m.get("baseline") or {})


def cmd_sign(args: argparse.Namespace) -> None:
    from models.registry import ModelNotFound, Registry
    from models.signing import keys_dir
    from tasks.lake import Lake

    registry = Registry(Lake.at(args.lake))
    try:
        previous, manifest = registry.sign(args.version)
    except (ModelNotFound, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    print(f"signed {args.version}: seal {manifest['seal'][:16]}… (was {str(previous)[:16]}…) with key "
          f"{manifest['signature']['key_id']} from {keys_dir()}\n"
          f"screen re-decides or re-scores its predictions that no longer match it")


def cmd_promote(args: argparse.Namespace) -> None:
    from models.registry import ModelNotFound, Registry
    from tasks.lake import Lake

    registry = Registry(Lake.at(args.lake))
    try:
        registry.promote(args.version)
    except (ModelNotFound, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    print(f"promoted {args.version}: `screenline screen` scores with it from now on")


def run_screen(lake: str | None, version: str | None = None, workers: int | None = None,
               dask: str | None = None, engine: str = "auto", allow_failed_gate: bool = False) -> "object":
    """Run the screen flow and print where the predictions are."""
    from models.registry import ModelNotFound

    from flows.screen import screen_on

    _check_engine(engine)
    try:
        flow_fn = screen_on(workers, dask)
    except ImportError as exc:
        raise CliError(str(exc)) from None
    try:
        report = flow_fn(lake=lake, version=version, workers=workers, engine=engine,
                         allow_failed_gate=allow_failed_gate)
    except (ModelNotFound, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    rate = report.scored / report.seconds if report.seconds else 0.0
    print(
        f"\nscreened with {report.version} at batch {report.batch}: {report.scored} image(s) scored "
        f"({rate:,.0f} images/s), {report.redecided} re-decided at a changed threshold, {report.flagged} flagged "
        f"positive; {sum(s.status == 'already_scored' for s in report.shards)} shard(s) already scored"
        + (f"; {report.superseded} predictions file(s) of shards no longer in the lake moved aside"
           if report.superseded else "")
        + (f"\n  warning: {report.version} {report.gate}" if report.gate != "passed" else "")
        + f"\n  predictions: {_predictions_dir(report.lake, report.version)}/"
    )
    return report


def cmd_screen(args: argparse.Namespace) -> None:
    run_screen(args.lake, args.version, args.workers, args.dask, args.engine, args.allow_failed_gate)


def cmd_results(args: argparse.Namespace) -> None:
    from tasks.results import ResultsQuery, write_results

    query = ResultsQuery(version=args.version, run_id=args.run_id, since=args.since, until=args.until,
                         positives_only=args.positives)
    try:
        n, where = write_results(args.lake, query, args.out)
    except (ValueError, RuntimeError) as exc:  # no predictions, an untrusted manifest: one line each
        raise CliError(str(exc)) from None
    if where:
        print(f"wrote {n} prediction(s) to {where}", file=sys.stderr)


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{value:.4f}"


def _print_audit(report: "object") -> None:
    from flows.audit import AuditReport

    assert isinstance(report, AuditReport)
    s = report.summary
    print(f"\naudit {s.audit_id}: {s.version} at threshold {s.threshold:.4f}, target {s.target:.0%}: "
          f"{s.verdict.upper()}")
    if not s.subsets:
        print("  no labelled subsets in the lake: sensitivity not audited (ingest one with --subset NAME)")
    for r in s.subsets:
        both = " (both halves)" if r["claim"].startswith("judged on its verification half") else ""
        print(f"  {r['subset']} ({r['verdict']}): {r['n']} images{both}, {r['positives']} positive; sensitivity "
              f"{_pct(r['sensitivity'])} (two-sided 95% CI: exact {r['sensitivity_cp_low']:.4f}–"
              f"{r['sensitivity_cp_high']:.4f}, Wilson {r['sensitivity_wilson_low']:.4f}–"
              f"{r['sensitivity_wilson_high']:.4f}), specificity "
              f"{_pct(r['specificity'])}, AUC {_pct(r['auc'])}\n    {r['claim']}")
        if r.get("operating_point", "shipped") != "shipped":
            print(f"    decided at {r['operating_point']} ({r['threshold']:.4f}); at the shipped threshold "
                  f"{r['shipped_threshold']:.4f} sensitivity would be {_pct(r['shipped_sensitivity'])}, specificity "
                  f"{_pct(r['shipped_specificity'])}")
    for sentence in s.weak_groups:
        print(f"  warning: {sentence}")
    print(f"  drift: {'FLAGGED: ' if s.drift.get('flagged') else ''}{s.drift.get('why', '?')}\n"
          f"  report: {report.report}")


def _not_shown(report: "object") -> None:
    """Exit 3 when an audit could not show the target: scripts must not read it as a pass."""
    verdict = report.verdict
    if verdict in ("inconclusive", "not audited"):
        why = "; ".join(report.summary.inconclusive) or "the lake has no labelled subset"
        raise CliError(f"audit {verdict}: the sensitivity target is not shown ({why})", NOT_SHOWN)


def run_audit(lake: str | None, **params: object) -> "object":
    """Run the audit flow and print its figures; a failed audit is a one-line error after the report is written."""
    from flows.audit import audit
    from models.registry import ModelNotFound
    from tasks.audit import AuditFailed

    try:
        report = audit(lake=lake, **params)
    except AuditFailed as exc:
        raise CliError(str(exc)) from None
    except (ModelNotFound, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    _print_audit(report)
    return report


def cmd_audit(args: argparse.Namespace) -> None:
    report = run_audit(args.lake, version=args.version, subsets=args.subset, batch=args.batch,
                       threshold=args.threshold, target_sensitivity=args.target_sensitivity, one_sided=args.one_sided)
    _not_shown(report)


def _print_calibration(result: "object") -> None:
    from tasks.calibrate import SiteCalibration

    assert isinstance(result, SiteCalibration)
    cal, ver, ship = result.calibration, result.verification, result.verification_at_shipped
    halves = result.halves
    print(f"\ncalibration {result.calibration_id}: {result.version} ({result.engine}) on subset {result.subset!r}\n"
          f"  halves by image hash: calibration {halves['calibration']['images']} images "
          f"({halves['calibration']['positives']} positive), verification {halves['verification']['images']} "
          f"({halves['verification']['positives']} positive)\n"
          f"  site threshold {result.threshold:.4f} (shipped {result.shipped_threshold:.4f}): {cal['statement']}")
    print("  on the verification half (no part in the choice):")
    for label, f in (("site threshold", ver), ("shipped threshold", ship)):
        print(f"    {label:<17} sensitivity {_pct(f['sensitivity'])} ({f['tp']}/{f['positives']}; exact 95% CI "
              f"{f['sensitivity_cp_low']:.4f}–{f['sensitivity_cp_high']:.4f}), specificity {_pct(f['specificity'])} "
              f"({f['tn']}/{f['negatives']}; {f['specificity_cp_low']:.4f}–{f['specificity_cp_high']:.4f}), "
              f"{f['normals_flagged_per_1000']:.0f} normals flagged per 1,000 screened")
    print(f"    {ver['claim']}")
    for name, f in result.elsewhere.items():
        print(f"  subset {name!r} at the site threshold: sensitivity {_pct(f['sensitivity'])} ({f['tp']}/"
              f"{f['positives']}), specificity {_pct(f['specificity'])}")
    print(f"  record: {result.record_file}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from flows.calibrate import calibrate
    from models.registry import ModelNotFound
    from tasks.calibrate import CalibrationRefused, reset
    from tasks.lake import Lake

    if not args.reset and not args.subset:
        raise CliError("--subset NAME is required: the labelled subset of this site's images to calibrate on")
    try:
        if args.reset:
            reset(Lake.at(args.lake), args.version)
            print("site operating point removed: the shipped threshold decides from the next screen")
            return
        result = calibrate(subset=args.subset, lake=args.lake, version=args.version, apply=args.apply,
                           delta=args.delta, one_sided=args.one_sided)
    except CalibrationRefused as exc:
        raise CliError(f"calibration refused: {exc}") from None
    except (ModelNotFound, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    _print_calibration(result)
    print(f"applied {result.name} to {result.version}: `screenline screen` re-decides every prediction with it"
          if result.applied else "not applied (pass --apply to decide with it)")


def run_nightly(inbox: str | None, lake: str | None) -> "object":
    """Run the nightly flow and say what it did and where the report is."""
    from flows.nightly import nightly
    from models.registry import ModelNotFound
    from tasks.audit import AuditFailed
    from tasks.shards import ShardNotFound

    try:
        report = nightly(inbox=inbox, lake=lake)
    except (AuditFailed, ModelNotFound, ShardNotFound, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    print(f"\nnightly: {report.message}")
    if report.audit is not None:
        _print_audit(report.audit)
        print(f"  predictions: {_predictions_dir(report.lake, report.screen.version)}/")
    return report


def cmd_nightly(args: argparse.Namespace) -> None:
    report = run_nightly(args.inbox, args.lake)
    if report.audit is not None:
        _not_shown(report.audit)


def cmd_demo(args: argparse.Namespace) -> None:
    from tasks.lake import Lake, lake_root

    _check_optimize_extra()
    samples = Path(args.samples)
    if not (samples / "train").exists():
        cmd_samples(argparse.Namespace(out=str(samples), n=args.n, prevalence=0.1, seed=0, no_defects=False,
                                       force=True))
    else:
        print(f"using the sample set already in {samples}/")
    lake = str(lake_root(args.lake))
    print("\n== ingest: labelled training shards")
    run_ingest([str(samples / "train")], lake)
    print("\n== ingest: labelled hold-out subset for audits")
    run_ingest([str(samples / "holdout")], lake, subset="holdout")
    counts = Lake.at(lake).counts()
    print(
        f"\nlake {lake}: {counts['images']} images ({counts['labelled']} labelled), {counts['rejects']} rejects\n"
        f"read it with: python -c \"import pyarrow.parquet as pq; print(pq.read_table('{lake}/images').num_rows)\""
    )
    print("\n== optimize: train, export, quantize, calibrate, gate, register, promote\n"
          "(the threshold on the validation split; `--calibrate-on crossfit` trades ~50 more minutes for a higher "
          "one, and `--baseline train` adds the side-by-side with a ResNet18 and its gate: see README)")
    run_optimize(lake)
    print(f"models: {lake}/models/  (list them with `screenline models --lake {lake}`)")
    print("\n== nightly: the inbox → ingest → screen (every image in the lake, at this host's knee) → audit")
    report = run_nightly(str(samples / "inbox"), lake)
    print(f"\npull predictions: screenline results --lake {lake} --out predictions.parquet  (or .csv)\n"
          f"predictions: {_predictions_dir(lake, report.screen.version)}/\n"
          f"report:      {report.report}")


def _multiplier(text: str) -> float:
    """A width or depth multiplier: a number in (0, 4] (models/nets.py refuses others, but only after the split)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 4:
        raise argparse.ArgumentTypeError(f"{text!r}: give a multiplier above 0 and at most 4")
    return value


def _epochs(text: str) -> int:
    """An epoch count: a whole number ≥ 1 (argparse prints the usage and this error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} epochs: give a whole number, at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="screenline",
        description="Batch screening of 64×64 medical images with Prefect: ingest shards into a Parquet lake.",
        epilog="Start with `screenline demo`, or `screenline samples` then `screenline ingest samples/train`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("samples", help="write a generated, deterministic sample set of shards")
    p.add_argument("--out", default="samples", help="folder to write (default: ./samples)")
    p.add_argument("--n", type=int, default=24000, help="labelled training images (default: 24000)")
    p.add_argument("--prevalence", type=float, default=0.1, help="fraction of positives (default: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-defects", action="store_true", help="leave out the few deliberately bad entries")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser(
        "ingest",
        help="land shards in the lake",
        description="Validate shards and land them in LAKE/images (one Parquet per shard); "
        "refused entries go to LAKE/rejects with a reason. Re-ingesting the same bytes writes nothing.",
    )
    p.add_argument("shards", nargs="+", metavar="PATH_OR_GLOB",
                   help="a folder of PNG/JPEG (+ labels.csv), a .npz (MedMNIST layout), a .tar (WebDataset), "
                        "a folder of such shards, or a quoted glob")
    _lake_arg(p)
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="the lake's channel count (fixed by the first ingest; default: from the first image)")
    p.add_argument("--resize", action="store_true", help="resize images that are not 64×64 instead of refusing them")
    p.add_argument("--subset", help="mark these images as a labelled audit subset of this name (e.g. holdout)")
    p.add_argument("--test-subset", metavar="NAME",
                   help="land the test split of a MedMNIST .npz (test_images/test_labels) as the labelled audit "
                        "subset NAME; its train and val splits stay training data")
    p.add_argument("--replace", metavar="SHARD_ID", action="append",
                   help="this delivery replaces the shard SHARD_ID (its images, labels and rejects move to "
                        ".superseded/), whatever its path; repeatable. A corrected delivery from the same path "
                        "replaces the earlier one without it when it holds every image that one held")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "optimize",
        help="train the fast net, export, quantize, calibrate, gate and promote",
        description="Train the native-64 MobileNetV2-style net on the lake's labelled images, export it to ONNX "
        "(BatchNorm folded), quantize to INT8, calibrate each engine's threshold for the sensitivity target on "
        "validation, measure this host's knee, and register the version; promote it only if held-out test "
        "sensitivity reaches the target.",
    )
    _lake_arg(p)
    # Options the flow has a default for are passed only when given (SUPPRESS), so the flow's signature (read from
    # TrainSettings and GateSettings) is the one home of each default; the help repeats it, and a test checks it does.
    p.add_argument("--epochs", type=_epochs, default=argparse.SUPPRESS, help="training epochs (default 16)")
    p.add_argument("--width", type=_multiplier, default=argparse.SUPPRESS,
                   help="width multiplier (capacity vs speed; default 1.25)")
    p.add_argument("--depth", type=_multiplier, default=argparse.SUPPRESS,
                   help="depth multiplier: each stage keeps ceil(blocks x depth) of its blocks (default 1.0; "
                        "--width 1.5 --depth 0.5 runs 1.37x faster and kept ~0.01-0.03 less specificity at 98%%)")
    # the stems are models/nets.STEMS, spelled out here because the CLI does not import torch
    p.add_argument("--stem", default=argparse.SUPPRESS, choices=("conv3s2", "patch4"),
                   help="ScreenNet's stem: patch4 (4x4 stride-4 patches straight to 16x16; default patch4) or "
                        "conv3s2 (3x3 stride 2, then a 32x32 stage: the stem before 2026-12-01)")
    p.add_argument("--arch", default=argparse.SUPPRESS, choices=("screennet", "resnet18", "resnet18-native"),
                   help="screennet (default); the seed's resnet18 (64→224) or resnet18-native to compare")
    p.add_argument("--teacher", help="a checkpoint (state_dict) to distil from, without a baseline")
    p.add_argument("--baseline", metavar="CKPT|train",
                   help="the model this replaces: its state_dict checkpoint, or `train` (a ResNet18 at 64×64 trained "
                        "here, ~15 min on 2 cores). Scored like a candidate on the same split and shown side by "
                        "side; a candidate ships only if non-inferior to it at matched sensitivity")
    p.add_argument("--baseline-arch", choices=("resnet18", "resnet18-native"),
                   help="a bare ResNet18 checkpoint's forward: resnet18 (the seed's 64→224 upsample; assumed when "
                        "not given) or resnet18-native")
    p.add_argument("--spec-margin", type=float, default=argparse.SUPPRESS,
                   help="non-inferiority margin: specificity at the target sensitivity may be at most this much "
                        "below the baseline's, judged by the paired bootstrap interval's lower end (default 0.03)")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="with --baseline: also distil the net from it (default off: measured neutral to harmful "
                        "unless the baseline is the stronger model; see README)")
    p.add_argument("--target-sensitivity", type=float, default=argparse.SUPPRESS,
                   help="the sensitivity every gate holds the model to (default 0.98)")
    p.add_argument("--threshold-rule", default=argparse.SUPPRESS, choices=("pac", "quantile"),
                   help="pac (default): the highest threshold whose sensitivity on new images reaches the target "
                        "with probability ≥ 1 − delta; quantile: target + 1%% on validation, no guarantee")
    p.add_argument("--delta", type=float, default=argparse.SUPPRESS,
                   help="pac: the chance the guarantee may fail (default 0.05: sensitivity ≥ target with 95%%)")
    p.add_argument("--gate-on-lower-bound", action="store_true",
                   help="promote only if the exact lower bound of held-out sensitivity (two-sided 95%%) reaches the "
                        "target, not only its point estimate")
    p.add_argument("--calibrate-on", choices=["val", "crossfit"], default=argparse.SUPPRESS,
                   help="val (default): the threshold rule on the validation split (one training); crossfit: on the "
                        "out-of-fold scores of --folds models trained the same way on folds of train+val (FOLDS "
                        "times the positives, a higher threshold, FOLDS more trainings: ~1 hour on 2 cores)")
    p.add_argument("--folds", type=int, default=argparse.SUPPRESS, help="crossfit: how many fold models (default 5)")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="training seed (default 0)")
    p.add_argument("--no-promote", dest="promote", action="store_false",
                   help="register without promoting (comparison runs)")
    p.add_argument("--test-subset", dest="test_subsets", metavar="NAME", action="append",
                   help="a labelled audit subset (ingested with --subset NAME) whose images join the held-out test "
                        "split, so every held-out gate rests on its positives too: a site's evaluation set, a "
                        "benchmark's official test split. Nothing trains or calibrates on it; repeatable")
    _engine_arg(p)
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("models", help="list registered model versions, their gate and whether they are trusted")
    _lake_arg(p)
    p.add_argument("--version", help="show this version's threshold rule and operating curve (default: promoted)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "sign", help="re-seal and sign a manifest you changed by hand (needs this host's signing key)",
        description="Screening uses a manifest only if its content matches the seal a trusted key signed. After "
        "changing one by hand (a threshold, say) and reviewing it, sign it again with this host's key "
        "($SCREENLINE_KEYS, default ~/.config/screenline/keys); screen then re-decides or re-scores the predictions "
        "that no longer match it.")
    p.add_argument("version")
    _lake_arg(p)
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("promote", help="make a registered version that passed its gate the one screening uses")
    p.add_argument("version")
    _lake_arg(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("screen", help="score every image in the lake with the promoted model")
    _lake_arg(p)
    p.add_argument("--version", help="a registered model version (default: the promoted one)")
    p.add_argument("--workers", type=int, help="shard tasks at once (default: one per core)")
    p.add_argument("--dask", metavar="ADDRESS|local",
                   help="run the shard tasks on a Dask cluster (scheduler address, or `local` for a LocalCluster)")
    p.add_argument("--allow-failed-gate", action="store_true",
                   help="screen with a version whose held-out sensitivity gate failed (refused otherwise); its "
                        "predictions record the override")
    _engine_arg(p)
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("results", help="pull predictions as Parquet or CSV, joined with shard and source")
    _lake_arg(p)
    p.add_argument("--version", help="predictions of this model version (default: the promoted one)")
    p.add_argument("--run-id", help="predictions written by this screen flow run")
    p.add_argument("--since", help="scored at or after this ISO date/time (UTC)")
    p.add_argument("--until", help="scored before this ISO date/time (UTC)")
    p.add_argument("--positives", action="store_true", help="only images flagged positive")
    p.add_argument("--out", help="FILE.parquet or FILE.csv (default: CSV on standard output)")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser(
        "audit",
        help="sensitivity on labelled subsets with confidence intervals, subgroups, drift, and an HTML report",
        description="Join a model's predictions with the labels of the lake's labelled subsets (ingested with "
        "--subset): per subset and per shard the 2×2 table, sensitivity and specificity with exact and Wilson 95% "
        "intervals, PPV, NPV, AUC; score drift of a batch against the model's validation scores. Writes "
        "LAKE/audits/ and an HTML report; exits non-zero when a subset's sensitivity is below target.",
    )
    _lake_arg(p)
    p.add_argument("--version", help="model version (default: the promoted one)")
    p.add_argument("--subset", action="append", help="audit this subset (repeatable; default: every labelled one)")
    p.add_argument("--batch", action="append", metavar="SHARD_ID",
                   help="shard id to check for drift (repeatable; default: the shards of the newest screen run)")
    p.add_argument("--threshold", type=float, help="decide at this threshold instead of the shipped one")
    p.add_argument("--target-sensitivity", type=float, help="default: the model's gate")
    p.add_argument("--one-sided", action="store_true",
                   help="claim the target at the one-sided exact 95%% lower bound (default: the lower end of the "
                        "two-sided exact 95%% interval, a one-sided 97.5%% bound)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "calibrate", help="a site threshold: chosen on half of a labelled local subset, verified on the other half",
        description="Split a labelled subset (ingested with --subset) by image hash into a calibration half and a "
        "verification half; choose the threshold on the first with the version's rule (sensitivity ≥ target with "
        "probability ≥ 1 − delta); report the second at the new and the shipped threshold. --apply records it in "
        "the manifest (signed again) so screening decides with it. Refused, with the positives it would need, when "
        "the subset cannot support it.")
    p.add_argument("--subset", help="the labelled subset of this site's images")
    _lake_arg(p)
    p.add_argument("--version", help="model version (default: the promoted one)")
    p.add_argument("--apply", action="store_true", help="decide with the site threshold from the next screen")
    p.add_argument("--reset", action="store_true", help="remove the site threshold: the shipped one decides again")
    p.add_argument("--delta", type=float, help="the rule's delta (default: the version's own)")
    p.add_argument("--one-sided", action="store_true", help="verify the claim at the one-sided exact bound")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("nightly", help="ingest the inbox, screen, audit: what the nightly deployment runs")
    _lake_arg(p)
    p.add_argument("--inbox",
                   help="the folder sites drop shards in (default: $SCREENLINE_INBOX or ./inbox)")
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("demo", help="generate samples and run the pipeline on them, then print a summary")
    p.add_argument("--samples", default="build/samples", help="sample set folder (default: build/samples)")
    p.add_argument("--n", type=int, default=24000, help="labelled training images to generate (default: 24000)")
    _lake_arg(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `screenline` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.func.__name__ in FLOW_COMMANDS:
            _check_lake(getattr(args, "lake", None))
            _one_line_errors()
        args.func(args)
    except CliError as exc:
        print(f"screenline: {'error: ' if exc.code == 2 else ''}{exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("screenline: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the disk, not the data: say which file and why, retry when it is fixed
        if _tracebacks():
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"screenline: error: {exc.strerror or exc}{where}: fix that and run the command again (re-running is "
              f"safe: every step is idempotent)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (a bug or an error screenline did not foresee: one line, then how to see more)
        if _tracebacks():
            raise
        print(f"screenline: error: {type(exc).__name__}: {exc} ({TRACEBACKS_ENV}=1 shows the traceback)",
              file=sys.stderr)
        return 2
    return 0


FLOW_COMMANDS = {"cmd_ingest", "cmd_optimize", "cmd_screen", "cmd_audit", "cmd_calibrate", "cmd_nightly", "cmd_demo"}
"""Commands that write a lake through Prefect flows: their lake is checked first, their logs lose tracebacks."""


if __name__ == "__main__":
    sys.exit(main())
