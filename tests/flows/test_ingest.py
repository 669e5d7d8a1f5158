"""The `ingest` flow end to end on a real (ephemeral) Prefect server, and the CLI and kill -9 through subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from session_env import ENV
from flows.ingest import ingest
from helpers import images, lake_rows, task_states
from tasks.samples import make_samples, write_tar

pytestmark = pytest.mark.usefixtures("prefect_server")


def test_sample_set_lands_and_is_readable_by_pyarrow_pandas_and_duckdb(tmp_path, lake_dir):
    made = make_samples(tmp_path / "samples", n=120)
    report = ingest([str(tmp_path / "samples" / "train")], lake=str(lake_dir))
    assert [s.status for s in report.shards] == ["ingested"] * 3
    assert report.accepted == 120  # every generated image; the defects (a copy among them) are refused
    assert report.rejected == made.defects
    assert pq.read_table(lake_dir / "images").num_rows == report.accepted
    import pandas as pd

    assert len(pd.read_parquet(lake_dir / "rejects")) == made.defects
    con = duckdb.connect()
    assert con.execute(f"select count(*) from '{lake_dir}/images/*.parquet'").fetchone()[0] == report.accepted
    reasons = dict(con.execute(f"select reason, count(*) from '{lake_dir}/rejects/*.parquet' group by 1").fetchall())
    assert reasons == {"truncated": 1, "decode_error": 1, "duplicate": 1, "wrong_size": 1, "unsupported_entry": 1,
                       "missing_file": 1}


def test_reingest_writes_nothing_and_then_hits_the_cache(tar_shard, npz_shard, lake_dir):
    shards = [str(tar_shard[0]), str(npz_shard[0])]
    ingest(shards, lake=str(lake_dir))
    files = {p: p.stat().st_mtime_ns for p in lake_dir.rglob("*.parquet")}
    second = ingest(shards, lake=str(lake_dir))
    assert [s.status for s in second.shards] == ["already_in_lake"] * 2
    third = ingest(shards, lake=str(lake_dir), return_state=True)
    assert {p: p.stat().st_mtime_ns for p in lake_dir.rglob("*.parquet")} == files
    assert task_states(third).count("ingest-shard:Cached") == 2


def test_a_deleted_lake_is_written_again_not_served_from_cache(tar_shard, tmp_path):
    lake = tmp_path / "lake"
    for _ in range(2):
        ingest([str(tar_shard[0])], lake=str(lake))
    import shutil

    shutil.rmtree(lake)
    report = ingest([str(tar_shard[0])], lake=str(lake))
    assert report.shards[0].status == "ingested"
    assert pq.read_table(lake / "images").num_rows == 10


def test_options_given_after_the_fact_land_the_shard_again_and_a_cached_run_never_hides_it(tar_shard, lake_dir):
    shard = [str(tar_shard[0])]
    ingest(shard, lake=str(lake_dir))
    as_holdout = ingest(shard, lake=str(lake_dir), subset="holdout")
    assert [s.status for s in as_holdout.shards] == ["replaced"] and as_holdout.landed == 10
    assert set(pq.read_table(lake_dir / "images").column("subset").to_pylist()) == {"holdout"}
    # back to the first options: the first run's cached result must not stand in for what is landed now
    back = ingest(shard, lake=str(lake_dir), return_state=True)
    assert "ingest-shard:Cached" not in task_states(back) and back.result().shards[0].status == "replaced"
    assert set(pq.read_table(lake_dir / "images").column("subset").to_pylist()) == {None}
    assert pq.read_table(lake_dir / "images").num_rows == 10


def test_an_unreadable_shard_is_refused_while_the_others_land(tar_shard, tmp_path, lake_dir):
    bad = tmp_path / "shards" / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    report = ingest([str(tmp_path / "shards")], lake=str(lake_dir))
    status = {Path(s.shard).name: s.status for s in report.shards}
    assert status == {"corrupt.npz": "refused", "shard-000.tar": "ingested"}
    assert lake_rows(lake_dir, "rejects")["reason"] == ["unreadable_shard"]
    assert pq.read_table(lake_dir / "images").num_rows == 10


def test_channels_conflict_is_a_clear_error(tar_shard, lake_dir):
    ingest([str(tar_shard[0])], lake=str(lake_dir))
    with pytest.raises(ValueError, match="holds 1-channel images"):
        ingest([str(tar_shard[0])], lake=str(lake_dir), channels=3)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from([".npz", ".tar"]))
def test_random_bytes_never_crash_the_flow(tmp_path_factory, data, suffix):
    root = tmp_path_factory.mktemp("fuzzflow")
    (root / f"shard{suffix}").write_bytes(data)
    report = ingest([str(root / f"shard{suffix}")], lake=str(root / "lake"))
    assert len(report.shards) == 1 and not report.failed


# --- through the CLI, in subprocesses ------------------------------------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "screenline.cli", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_cli_missing_path_is_one_line(tmp_path):
    result = cli("ingest", str(tmp_path / "nope-*.tar"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"screenline: error: no shard matches '{tmp_path}/nope-*.tar'"]


def test_kill_9_midway_then_rerun_leaves_one_row_per_image(tmp_path):
    inbox, n_shards, per_shard = tmp_path / "inbox", 16, 150
    for i in range(n_shards):
        write_tar(inbox / f"shard-{i:02d}.tar", *images(per_shard, f"kill-{i}"), prefix=f"s{i}")
    lake = tmp_path / "lake"
    proc = subprocess.Popen(
        [sys.executable, "-m", "screenline.cli", "ingest", str(inbox), "--lake", str(lake)],
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list((lake / "images").glob("*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, "ingest ended before it was killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the ephemeral server it started
        proc.wait()
    landed_before = len(list((lake / "images").glob("*.parquet")))
    assert 0 < landed_before < n_shards, "the kill did not land mid-ingest"

    result = cli("ingest", str(inbox), "--lake", str(lake), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = lake_rows(lake, columns=["image_id", "shard_id", "source"])
    assert len(rows["image_id"]) == len(set(rows["image_id"])) == n_shards * per_shard
    assert len(list((lake / "images").glob("*.parquet"))) == n_shards
    from screenline.files import stale_temps

    assert stale_temps(lake) == []  # what the killed run was writing, the re-run removed
    assert [p.name for p in lake.rglob(".*") if p.name != ".lock"] == []
