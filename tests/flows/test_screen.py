"""The `screen` flow end to end: lineage, equality with the engine, caching, kill -9 resume, Dask, bad shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from session_env import ENV
from flows.ingest import ingest
from flows.screen import screen
from helpers import images, register_model, screen_plain, task_states
from models.engine import OrtEngine
from models.registry import ModelIntegrityError, Registry, host_fingerprint
from tasks.lake import Lake, footer, pixel_array
from tasks.results import ResultsQuery, query_results
from tasks.samples import write_tar

pytestmark = pytest.mark.usefixtures("prefect_server")


def make_lake(root: Path, shards: int = 3, per_shard: int = 40) -> Path:
    for i in range(shards):
        write_tar(root / "shards" / f"s{i}.tar", *images(per_shard, f"screen-{i}"), prefix=f"s{i}")
    ingest([str(root / "shards")], lake=str(root / "lake"))
    return root / "lake"


@pytest.fixture(scope="module")
def screened(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen")
    lake = make_lake(root)
    register_model(lake, "sn-a", seed=1, threshold=0.5)
    state = screen(lake=str(lake), return_state=True)
    return lake, state


def predictions(lake: Path, version: str) -> dict:
    return pq.read_table(lake / "predictions" / version).to_pydict()


def test_every_image_scored_once_with_lineage(screened):
    lake, state = screened
    report = state.result()
    assert report.scored == 120 and report.shards and not report.failed
    rows = predictions(lake, "sn-a")
    assert sorted(rows["image_id"]) == sorted(pq.read_table(lake / "images").column("image_id").to_pylist())
    assert set(rows["model_version"]) == {"sn-a"} and set(rows["engine"]) == {"onnxruntime"}
    assert set(rows["precision"]) == {"fp32"} and set(rows["threshold"]) == {0.5}
    assert set(rows["run_id"]) == {str(state.state_details.flow_run_id)}
    assert rows["positive"] == [s >= 0.5 for s in rows["score"]]
    assert pq.read_schema(next((lake / "predictions" / "sn-a").glob("*.parquet"))).field("score").type == "float"


def test_predictions_equal_the_engine_called_directly(screened):
    lake, _ = screened
    table = pq.read_table(lake / "images", columns=["image_id", "pixels"])
    engine = OrtEngine(lake / "models" / "sn-a" / "model-fp32.onnx")
    direct = dict(zip(table.column("image_id").to_pylist(), engine.infer(pixel_array(table.column("pixels"), 1))))
    rows = predictions(lake, "sn-a")
    np.testing.assert_allclose([direct[i] for i in rows["image_id"]], rows["score"], rtol=0, atol=1e-6)


def test_second_run_scores_nothing_and_a_new_model_rescores(screened):
    lake, _ = screened
    before = {p: p.stat().st_mtime_ns for p in (lake / "predictions").rglob("*.parquet")}
    again = screen(lake=str(lake))
    assert again.scored == 0 and {s.status for s in again.shards} == {"already_scored"}
    third = screen(lake=str(lake), return_state=True)
    states = task_states(third)
    assert not [s for s in states if s.startswith("screen-shard")]  # current shards start no task at all
    assert "triage-shards:Completed" in states
    assert {p: p.stat().st_mtime_ns for p in (lake / "predictions").rglob("*.parquet")} == before
    register_model(lake, "sn-b", seed=2, threshold=0.4)
    report = screen(lake=str(lake))
    assert report.version == "sn-b" and report.scored == 120
    assert len(predictions(lake, "sn-b")["image_id"]) == 120 and len(predictions(lake, "sn-a")["image_id"]) == 120


def test_a_threaded_run_shares_one_engine_made_for_as_many_callers_as_shard_tasks_run_at_once(screened):
    from models.engine import default_threads
    from tasks.screen import _ENGINES

    lake, _ = screened
    made = [key for key in _ENGINES if key[0] == str(lake) and key[1] == "sn-a"]
    workers = min(default_threads(), 3)  # three shards
    assert [(threads, callers) for *_, threads, callers, _batch in made] == [(default_threads() // workers, workers)]


def test_predictions_are_written_in_row_groups_of_the_images_files_size_not_one_a_batch(screened, tmp_path,
                                                                                       monkeypatch):
    import tasks.screen

    lake, _ = screened
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    shutil.rmtree(copy / "predictions")
    monkeypatch.setattr(tasks.screen, "ROW_GROUP_ROWS", 32)  # 40 images a shard, batches of 16 (the knee)
    screen_plain(Lake(copy), "sn-a")
    for file in (copy / "predictions" / "sn-a").glob("*.parquet"):
        meta = pq.ParquetFile(file).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [32, 8]  # not 16, 16, 8
    def rows(root):  # but for the run's own lineage (run_id, scored_at)
        table = predictions(root, "sn-a")
        return sorted(zip(*(v for k, v in table.items() if k not in ("run_id", "scored_at"))))

    assert rows(copy) == rows(lake) and len(rows(copy)) == 120


def test_scoring_a_shard_imports_no_pandas_and_allocates_from_jemalloc(screened, tmp_path):
    """pyarrow imports pandas (~48 MB) the first time pa.array or pa.scalar runs; screening builds its columns
    without them, and its Arrow memory comes from jemalloc (screenline/__init__.py)."""
    lake, _ = screened
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    shutil.rmtree(copy / "predictions")
    code = ("import sys; from tasks.lake import Lake; from helpers import screen_plain; import pyarrow as pa; "
            f"statuses = screen_plain(Lake.at({str(copy)!r}), 'sn-a'); "
            "print(sorted(set(statuses.values())), 'pandas' in sys.modules, pa.default_memory_pool().backend_name)")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in ENV.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**env, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "['scored'] False jemalloc"
    assert predictions(copy, "sn-a")["positive"] == [s >= 0.5 for s in predictions(copy, "sn-a")["score"]]


def test_results_join_source_and_filter(screened, tmp_path):
    lake, _ = screened
    everything = query_results(str(lake), ResultsQuery(version="sn-a"))
    # a copy of the lake whose model flags about half the images (sn-a's random weights at 0.5 flag none)
    half = tmp_path / "lake"
    shutil.copytree(lake, half)
    median = float(np.median(everything.column("score").to_numpy()))
    register_model(half, "sn-half", seed=1, threshold=median)
    screen_plain(Lake(half), "sn-half")
    scored = query_results(str(half), ResultsQuery(version="sn-half"))
    table = query_results(str(half), ResultsQuery(version="sn-half", positives_only=True))
    flagged = sum(scored.column("positive").to_pylist())
    assert 0 < table.num_rows == flagged < scored.num_rows  # exactly the flagged rows, not none and not all
    assert set(table.column("positive").to_pylist()) == {True}
    assert everything.num_rows == 120 and everything.column("source").null_count == 0
    assert query_results(str(lake), ResultsQuery(version="sn-a", since="2999-01-01")).num_rows == 0
    with pytest.raises(ValueError, match="ISO"):
        query_results(str(lake), ResultsQuery(version="sn-a", since="yesterday"))


def test_knee_is_measured_and_stored_when_this_host_has_none(tmp_path):
    lake = make_lake(tmp_path, shards=1, per_shard=20)
    register_model(lake, "sn-k", seed=3, knee=None)
    report = screen(lake=str(lake))
    knees = Registry(Lake(lake)).manifest("sn-k").knees
    assert report.batch == knees[host_fingerprint("onnxruntime", "fp32")]["batch"]


def test_a_corrupt_shard_fails_its_task_clearly_while_the_others_are_scored(tmp_path):
    lake = make_lake(tmp_path)
    register_model(lake, "sn-c", seed=4)
    victim = sorted((lake / "images").glob("*.parquet"))[0]
    victim.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(RuntimeError, match=f"{victim.stem}.*not readable Parquet"):
        screen(lake=str(lake))
    scored = sorted(p.stem for p in (lake / "predictions" / "sn-c").glob("*.parquet"))
    assert len(scored) == 2 and victim.stem not in scored


def test_dask_local_cluster_gives_the_same_predictions_as_threads(screened, tmp_path):
    pytest.importorskip("prefect_dask")
    from prefect_dask import DaskTaskRunner

    lake, _ = screened
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy, ignore=shutil.ignore_patterns("predictions"))
    Registry(Lake(copy)).promote("sn-a")
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                            "dashboard_address": None})
    report = screen.with_options(task_runner=runner)(lake=str(copy), workers=2)
    assert report.scored == 120
    threads = dict(zip(*[predictions(lake, "sn-a")[k] for k in ("image_id", "score")]))
    dask = dict(zip(*[predictions(copy, "sn-a")[k] for k in ("image_id", "score")]))
    assert threads.keys() == dask.keys()
    np.testing.assert_allclose([dask[k] for k in threads], list(threads.values()), rtol=0, atol=1e-6)


def test_kill_9_midway_then_rerun_gives_one_prediction_per_image(tmp_path):
    lake = make_lake(tmp_path, shards=12, per_shard=400)
    register_model(lake, "sn-k9", seed=5, knee=1)  # batch 1: slow enough to kill mid-run
    proc = subprocess.Popen([sys.executable, "-m", "screenline.cli", "screen", "--lake", str(lake)], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = lake / "predictions" / "sn-k9"
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, "screen ended before it was killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < len(list(out.glob("*.parquet"))) < 12, "the kill did not land mid-run"
    result = subprocess.run([sys.executable, "-m", "screenline.cli", "screen", "--lake", str(lake)], cwd=tmp_path,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = pq.read_table(out, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12 * 400


# --- trust: predictions follow images/ and the operating point; refused models and paths --------------------------


def test_the_issues_sequence_through_the_flows_keeps_one_prediction_per_image_and_an_exact_audit(tmp_path):
    """A corrupt images file, deleted and re-ingested as the error advises, while an overlapping shard lands first:
    the stale predictions are scored again, the old ones moved aside, and the audit counts the lake's images."""
    from flows.audit import audit

    x, y = images(300, "overlap", prevalence=0.5)
    write_tar(tmp_path / "a" / "a.tar", x[:200], y[:200], prefix="a")
    write_tar(tmp_path / "b" / "b.tar", x[100:], y[100:], prefix="b")  # shares 100 images with a
    first = ingest([str(tmp_path / "a")], lake=str(tmp_path / "lake"), subset="holdout")
    lake = tmp_path / "lake"
    register_model(lake, "sn-ov", seed=6, threshold=0.0)  # flags everything: every positive found
    screen(lake=str(lake))
    a = first.shards[0].shard_id
    (lake / "images" / f"{a}.parquet").write_bytes(b"PAR1 corrupt")
    with pytest.raises(RuntimeError, match="delete the file, then run ingest on its source again"):
        screen(lake=str(lake))
    (lake / "images" / f"{a}.parquet").unlink()
    ingest([str(tmp_path / "b")], lake=str(lake), subset="holdout")  # lands all 200, the 100 shared ones too
    again = ingest([str(tmp_path / "a")], lake=str(lake), subset="holdout")
    assert again.shards[0].accepted == 100 and again.shards[0].reasons == {"duplicate": 100}
    with pytest.raises(ValueError, match="images changed since they were scored.*screenline screen"):
        audit(lake=str(lake))
    report = screen(lake=str(lake))
    assert report.scored == 300 and {s.status for s in report.shards} == {"scored"}
    in_lake = sorted(pq.read_table(lake / "images", columns=["image_id"]).column(0).to_pylist())
    assert sorted(predictions(lake, "sn-ov")["image_id"]) == in_lake and len(in_lake) == 300
    audited = audit(lake=str(lake), subsets=["holdout"])
    assert audited.summary.subsets[0]["n"] == 300 and audited.summary.subsets[0]["positives"] == int(y.sum())


def test_screening_a_version_whose_gate_failed_is_refused_unless_overridden(tmp_path):
    lake = make_lake(tmp_path, shards=2, per_shard=20)
    register_model(lake, "sn-good", seed=1)
    register_model(lake, "sn-failed", seed=2, passed_gate=False)
    cli = [sys.executable, "-m", "screenline.cli", "screen", "--lake", str(lake), "--version", "sn-failed"]
    refused = subprocess.run(cli, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "sn-failed's onnxruntime engine did not pass its held-out sensitivity gate" in refused.stderr
    assert "--allow-failed-gate" in refused.stderr and not (lake / "predictions" / "sn-failed").exists()
    allowed = subprocess.run([*cli, "--allow-failed-gate"], env=ENV, capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: sn-failed overridden: did not pass" in allowed.stdout
    files = list((lake / "predictions" / "sn-failed").glob("*.parquet"))
    assert len(files) == 2
    assert all(footer(f)["screenline.gate"].startswith("overridden: did not pass") for f in files)


def test_a_promoted_pointer_outside_the_lake_writes_nothing_anywhere(tmp_path):
    lake = make_lake(tmp_path, shards=1, per_shard=10)
    register_model(lake, "sn-p", seed=1)
    (lake / "models" / "PROMOTED").write_text('{"version": "../../outside/ver"}')
    with pytest.raises(ModelIntegrityError, match="not a promotion this host trusts"):
        screen(lake=str(lake))
    assert not (tmp_path / "outside").exists() and not (lake / "predictions").exists()


def test_a_new_threshold_re_decides_old_predictions_through_the_flow(screened, tmp_path):
    lake, _ = screened
    copy = tmp_path / "lake"
    shutil.copytree(lake, copy)
    Registry(Lake(copy)).promote("sn-a")
    before = predictions(copy, "sn-a")
    manifest_path = copy / "models" / "sn-a" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shipping"]["threshold"] = 0.45
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="changed after it was signed"):
        screen(lake=str(copy))  # an unsigned edit decides nothing
    Registry(Lake(copy)).sign("sn-a")
    report = screen(lake=str(copy))
    assert report.redecided == 120 and report.scored == 0
    after = predictions(copy, "sn-a")
    by_id = dict(zip(before["image_id"], before["score"]))
    assert [by_id[i] for i in after["image_id"]] == after["score"]  # scores kept, not recomputed
    assert set(after["threshold"]) == {np.float32(0.45)}
    assert after["positive"] == [s >= np.float32(0.45) for s in after["score"]]
    assert screen(lake=str(copy)).redecided == 0


def test_an_images_file_altered_after_ingest_is_refused_not_scored(tmp_path):
    lake = make_lake(tmp_path, shards=1, per_shard=20)
    register_model(lake, "sn-alt", seed=1)
    (victim,) = (lake / "images").glob("*.parquet")
    table = pq.read_table(victim)
    meta = pq.read_metadata(victim).metadata
    pq.write_table(table.slice(0, 10).replace_schema_metadata(meta), victim)  # rows dropped, footer kept
    with pytest.raises(RuntimeError, match="holds other images than its footer records"):
        screen(lake=str(lake))
    assert not list((lake / "predictions" / "sn-alt").glob("*.parquet"))


def test_results_leave_out_stale_predictions_and_say_how_to_refresh_them(tmp_path):
    lake = make_lake(tmp_path, shards=2, per_shard=20)
    register_model(lake, "sn-r", seed=1)
    screen(lake=str(lake))
    gone = sorted((lake / "images").glob("*.parquet"))[0]
    gone.unlink()
    cli = [sys.executable, "-m", "screenline.cli", "results", "--lake", str(lake), "--out", str(tmp_path / "r.parquet")]
    done = subprocess.run(cli, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"left out stale predictions of 1 shard(s) of sn-r (e.g. {gone.stem}: its shard is no longer in the lake)" \
        in done.stderr and "screenline screen" in done.stderr
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 20


def test_screen_on_runs_as_many_shard_tasks_at_once_as_workers_says():
    """`screenline screen --workers N` (screen_on): N threads for the shard tasks, not the deployed default."""
    from flows.screen import screen_on
    from models.engine import default_threads

    assert screen_on(5).task_runner._max_workers == 5  # Prefect's ThreadPoolTaskRunner keeps its size there
    assert screen_on().task_runner._max_workers == default_threads()
