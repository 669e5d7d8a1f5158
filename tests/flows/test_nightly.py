"""The `nightly` flow: inbox → ingest → screen → audit in one run; empty inbox; a second night scores nothing."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.nightly import nightly
from helpers import images, labelled_lake_with_model, task_states
from tasks.samples import SITES, generate, write_png_folder, write_tar

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    """A lake with a labelled hold-out subset (≥ 183 positives) and a promoted model, and an inbox with two
    unlabelled shards."""
    hold_x, hold_y = images(400, "nightly-holdout", prevalence=0.5)
    write_tar(tmp_path / "holdout" / "hold.tar", hold_x, hold_y, prefix="hold")
    labelled_lake_with_model(tmp_path / "lake", tmp_path / "holdout", hold_x, hold_y)
    inbox = tmp_path / "inbox"
    write_png_folder(inbox / "night-001", generate(60, 0.1, 7, SITES["a"], "n1")[0], None, prefix="scan")
    write_tar(inbox / "night-002.tar", generate(80, 0.1, 7, SITES["b"], "n2")[0], None, prefix="scan")
    (inbox / "README.txt").write_text("drop shards here\n")
    return tmp_path / "lake", inbox


def prediction_files(lake: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (lake / "predictions").rglob("*.parquet")}


def test_a_night_ingests_screens_and_audits_in_one_run(site):
    lake, inbox = site
    report = nightly(inbox=str(inbox), lake=str(lake))
    assert report.ingest.landed == 140 and report.screen.scored == 540  # the inbox, and the hold-out's first scoring
    assert report.audit.passed and Path(report.report).is_file() and "audit passed" in report.message
    assert "2 shard(s) in the inbox, 2 new: 140 image(s) landed" in report.message
    assert report.audit.summary.drift["batch_n"] == 140  # the night's shards, not the hold-out
    night_ids = {s.shard_id for s in report.ingest.shards}
    scored = {p.stem for p in (lake / "predictions" / "sn-spot").glob("*.parquet")}
    assert night_ids <= scored


def test_a_second_night_on_the_same_inbox_scores_nothing(site):
    lake, inbox = site
    first = nightly(inbox=str(inbox), lake=str(lake))
    files = prediction_files(lake)
    rows = pq.read_table(lake / "predictions").num_rows
    state = nightly(inbox=str(inbox), lake=str(lake), return_state=True)
    second = state.result()
    assert second.ingest.landed == 0 and second.screen.scored == 0
    assert prediction_files(lake) == files and pq.read_table(lake / "predictions").num_rows == rows
    assert second.report == first.report  # same predictions, same audit
    assert "2 shard(s) in the inbox, 0 new" in second.message


def test_an_empty_inbox_is_a_quick_successful_no_op(tmp_path: Path):
    (tmp_path / "inbox").mkdir()
    state = nightly(inbox=str(tmp_path / "inbox"), lake=str(tmp_path / "lake"), return_state=True)
    assert state.is_completed()
    report = state.result()
    assert "holds no shards: nothing to ingest, screen or audit" in report.message
    assert report.report is None and not (tmp_path / "lake").exists()
    assert task_states(state) == ["list-inbox:Completed"]


def test_a_missing_inbox_fails_with_what_to_do(tmp_path: Path):
    state = nightly(inbox=str(tmp_path / "no-such-inbox"), lake=str(tmp_path / "lake"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match="no-such-inbox is not a folder: create it, or pass the folder"):
        state.result()


def test_a_symlink_in_the_inbox_is_not_followed(site, tmp_path: Path):
    lake, inbox = site
    other = tmp_path / "another-site"
    write_png_folder(other / "scans", generate(30, 0.1, 7, SITES["c"], "not-ours")[0], None, prefix="x")
    (inbox / "linked").symlink_to(other / "scans")
    report = nightly(inbox=str(inbox), lake=str(lake))
    assert report.ingest.landed == 140 and len(report.shards) == 2
    landed_from = {Path(s.shard).name for s in report.ingest.shards}
    assert landed_from == {"night-001", "night-002.tar"}
