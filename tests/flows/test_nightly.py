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


def test_a_poisoned_inbox_costs_reject_rows_and_the_night_lands_screens_and_audits_the_rest(site, tmp_path: Path):
    import os
    import zipfile

    from helpers import lake_rows, png_bytes

    lake, inbox = site
    (inbox / "garbage.npz").write_bytes(b"PK\x03\x04 not really a zip" * 20)  # unreadable: one reject row
    with zipfile.ZipFile(inbox / "liar.npz", "w") as archive:  # declares 40 GB: refused from its header
        archive.writestr("images.npy", b"\x93NUMPY\x01\x00v\x00" + repr(
            {"descr": "|u1", "fortran_order": False, "shape": (10_000_000, 64, 64)}).encode().ljust(117) + b"\n")
    os.mkfifo(inbox / "stuck.npz")  # would block the night if opened
    mixed = inbox / "night-003"
    write_png_folder(mixed, generate(20, 0.1, 7, SITES["c"], "n3")[0], None, prefix="scan")
    (mixed / "lab.png").write_bytes(b"II*\x00" + b"\x00" * 200)  # a TIFF under a PNG name
    (mixed / "scan-\udcff.png".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")).write_bytes(
        png_bytes(images(1, "latin-night")[0][0]))
    report = nightly(inbox=str(inbox), lake=str(lake))
    assert report.ingest.landed == 140 + 20 and report.audit.passed  # every good image landed, the audit ran
    assert {Path(s.shard).name: s.status for s in report.ingest.shards} == {
        "night-001": "ingested", "night-002.tar": "ingested", "night-003": "ingested", "garbage.npz": "refused",
        "liar.npz": "refused"}  # the FIFO is not a shard: logged and left alone
    rejected = lake_rows(lake, "rejects")
    by_shard = {}
    for shard, entry, reason in zip(rejected["shard"], rejected["entry"], rejected["reason"]):
        by_shard.setdefault(Path(shard).name, {})[entry] = reason
    assert by_shard["garbage.npz"] == {None: "unreadable_shard"} and by_shard["liar.npz"] == {None: "bad_npz"}
    assert by_shard["night-003"] == {"lab.png": "decode_error", "scan-\\udcff.png": "bad_name"}
    landed = {s.shard_id for s in report.ingest.shards if s.accepted}
    assert landed <= {p.stem for p in (lake / "predictions" / "sn-spot").glob("*.parquet")}  # and screened


def test_a_shard_that_fails_its_retries_costs_only_itself_and_the_night_says_so(site, monkeypatch):
    import flows.ingest
    import tasks.ingest

    lake, inbox = site
    real = tasks.ingest.ingest_shard

    def disk_trouble(ref, *args):
        if ref.path.endswith("night-002.tar"):
            raise OSError(5, "Input/output error", ref.path)
        return real(ref, *args)

    monkeypatch.setattr(tasks.ingest, "ingest_shard", disk_trouble)
    monkeypatch.setattr(flows.ingest, "ingest_shard_task",
                        flows.ingest.ingest_shard_task.with_options(retries=1, retry_delay_seconds=0))
    state = nightly(inbox=str(inbox), lake=str(lake), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "1 shard(s) failed after retries and were not ingested" in message and "night-002.tar" in message
    assert "60 image(s) landed" in message and "audit passed" in message  # the rest was screened and audited
    assert len(pq.read_table(lake / "predictions" / "sn-spot").column("image_id")) == 400 + 60
