"""The footer memo (tasks/footers.py): an unchanged file's footer is served without opening it; a replaced, rewritten
or removed file is never served from it; a damaged memo is an empty one."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.footers as footers
from screenline.files import atomic_path
from tasks.footers import MEMO_NAME, FooterMemo
from tasks.lake import footer_and_rows


def write(path: Path, value: str, rows: int = 3) -> None:
    """A Parquet file whose footer records `value` (same length values: same file size), written as the lake writes
    (a temp file renamed into place)."""
    table = pa.table({"x": list(range(rows))}).replace_schema_metadata({"screenline.value": value})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_all(folder: Path) -> tuple[dict[str, tuple[dict, int]], int]:
    """One pass over the folder, as list_shards and triage make it: every file's footer, then save; and how many
    footers were read from files."""
    memo = FooterMemo(folder)
    seen = {p.name: memo.footer_and_rows(p) for p in sorted(folder.glob("*.parquet"))}
    memo.save()
    return seen, memo.reads


@pytest.fixture
def remembered(monkeypatch):
    """Files remembered however young (the test's files are milliseconds old; RACY_S is its own test)."""
    monkeypatch.setattr(footers, "RACY_S", 0.0)


def test_an_unchanged_folder_is_served_from_the_memo_with_the_same_footers(tmp_path, remembered):
    for name in "abc":
        write(tmp_path / f"{name}.parquet", f"v-{name}")
    first, reads = read_all(tmp_path)
    assert reads == 3 and (tmp_path / MEMO_NAME).is_file()
    second, reads = read_all(tmp_path)
    assert reads == 0
    assert second == first == {f"{n}.parquet": footer_and_rows(tmp_path / f"{n}.parquet") for n in "abc"}
    assert first["a.parquet"] == ({"screenline.value": "v-a"}, 3)


def test_a_replaced_file_is_read_again_even_at_the_same_size(tmp_path, remembered):
    write(tmp_path / "a.parquet", "old-1")
    read_all(tmp_path)
    size = (tmp_path / "a.parquet").stat().st_size
    write(tmp_path / "a.parquet", "new-2")  # renamed into place: another inode
    assert (tmp_path / "a.parquet").stat().st_size == size
    seen, reads = read_all(tmp_path)
    assert reads == 1 and seen["a.parquet"][0] == {"screenline.value": "new-2"}


def test_a_file_rewritten_in_place_with_its_size_and_mtime_kept_is_read_again(tmp_path, remembered):
    """Its ctime moved (user space cannot set it back); a later tick than the memo's read, as RACY_S ensures."""
    path = tmp_path / "a.parquet"
    write(path, "old-1")
    read_all(tmp_path)
    before = path.stat()
    time.sleep(0.05)
    other = tmp_path / "other.bin"
    write(other, "new-2")
    with open(path, "r+b") as handle:  # the same inode, new bytes
        handle.write(other.read_bytes())
        handle.truncate()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    other.unlink()
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    seen, reads = read_all(tmp_path)
    assert reads == 1 and seen["a.parquet"][0] == {"screenline.value": "new-2"}


def test_a_file_younger_than_the_racy_window_is_not_remembered(tmp_path):
    write(tmp_path / "a.parquet", "v-a")
    read_all(tmp_path)
    _, reads = read_all(tmp_path)
    assert reads == 1  # read again: written less than RACY_S before it was read


def test_a_removed_file_leaves_the_memo_and_a_missing_one_is_an_error_as_without_it(tmp_path, remembered):
    for name in "ab":
        write(tmp_path / f"{name}.parquet", f"v-{name}")
    read_all(tmp_path)
    (tmp_path / "b.parquet").unlink()
    read_all(tmp_path)
    assert set(json.loads((tmp_path / MEMO_NAME).read_text())["files"]) == {"a.parquet"}
    with pytest.raises(FileNotFoundError):
        FooterMemo(tmp_path).footer_and_rows(tmp_path / "b.parquet")


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"format": 99, "files": {}}', b"[1, 2]",
                                    b'{"format": 1, "files": {"a.parquet": "garbage"}}',
                                    b'{"format": 1, "files": {"a.parquet": [[1, 2, 3, 4], 3, {"k": 5}]}}'])
def test_a_damaged_memo_is_an_empty_one_and_is_written_whole_again(tmp_path, remembered, damage):
    write(tmp_path / "a.parquet", "v-a")
    (tmp_path / MEMO_NAME).write_bytes(damage)
    seen, reads = read_all(tmp_path)
    assert reads == 1 and seen["a.parquet"] == ({"screenline.value": "v-a"}, 3)
    assert read_all(tmp_path)[1] == 0


def test_a_file_that_is_not_parquet_raises_as_a_footer_read_does(tmp_path, remembered):
    (tmp_path / "a.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(pa.ArrowInvalid):
        FooterMemo(tmp_path).footer_and_rows(tmp_path / "a.parquet")
