"""Parquet footers remembered across runs, so that a run over a lake of many shards stats its files instead of
opening each one.

Screen decides which shards have work from two footers a shard: the images file's (the image-id digest it holds)
and the predictions file's (what it scored, with which graph, at which threshold). Reading them meant opening both
files of every shard ever landed, every night: for 200 shards (a 1M-image lake), 47 ms with the page cache warm and
117 ms with it dropped, growing with the lake; stats instead, 23 and 28 ms (README, "Screen's triage"). `FooterMemo` keeps one folder's footers in a hidden `.footers.json` beside its files, each under
the identity of the file it was read from: inode, size, mtime and ctime (nanoseconds). Every write in the lake
lands a new file by rename, so a replaced file has a new inode and ctime; a file changed in place has a new ctime,
which user space cannot set; either is read again.

Two races are closed as git closes them for its index. A file written in the same clock tick as it was read keeps
its timestamps (the kernel's are coarse), so an entry is recorded only for a file whose ctime is at least RACY_S
older than the read. And identity and footer come from one open file description (fstat, then the footer through
that handle), so a file replaced between the two is never recorded under the other's identity.

A memo that is missing, unreadable or of another format is an empty one; saving it is best-effort (a lake this
process cannot write screens as before, reading every footer). Whoever can write the memo can write the footers
themselves: it asks for no trust that the lake does not already.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow.parquet as pq

from screenline.files import atomic_write_bytes
from tasks.lake import key_values

MEMO_NAME = ".footers.json"
MEMO_FORMAT = 1
RACY_S = 2.0
"""A file changed less than this before it was read is not remembered (its next change could share its ctime)."""


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _well_formed(entry: object) -> bool:
    """[identity (4 ints), rows, {key: value}]: anything else in a memo is ignored."""
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], list) and len(entry[0]) == 4
            and all(type(v) is int for v in entry[0]) and type(entry[1]) is int and isinstance(entry[2], dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in entry[2].items()))


def read_footer(path: Path) -> tuple[dict[str, str], int, os.stat_result]:
    """A Parquet file's key-value metadata (without Arrow's schema entry), its row count, and the stat of the very
    file they were read from."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        meta = pq.read_metadata(handle)
    return key_values(meta), meta.num_rows, stat


class FooterMemo:
    """The footers of one folder's Parquet files, from `.footers.json` where a file is unchanged since it was read,
    else from the file. `save()` keeps the entries this memo served or read, so files gone from the folder drop
    out; use one memo for a pass over the whole folder (list_shards, triage), not for a single file."""

    def __init__(self, folder: Path):
        self.path = folder / MEMO_NAME
        self._known = self._load()
        self._used: dict[str, list] = {}
        self.reads = 0  # footers read from files (not served from the memo) by this instance

    def _load(self) -> dict[str, list]:
        try:
            memo = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(memo, dict) or memo.get("format") != MEMO_FORMAT or not isinstance(memo.get("files"), dict):
            return {}
        return {name: entry for name, entry in memo["files"].items() if _well_formed(entry)}

    def footer_and_rows(self, path: Path) -> tuple[dict[str, str], int]:
        """`tasks.lake.footer_and_rows` of a file in this memo's folder: remembered, or read (OSError, ArrowInvalid
        as a read raises them)."""
        entry = self._known.get(path.name)
        if entry is not None:
            try:
                unchanged = _identity(os.stat(path)) == entry[0]
            except OSError:
                unchanged = False
            if unchanged:
                self._used[path.name] = entry
                return dict(entry[2]), int(entry[1])
        meta, rows, stat = read_footer(path)
        self.reads += 1
        if time.time_ns() - stat.st_ctime_ns >= RACY_S * 1e9:
            self._used[path.name] = [_identity(stat), rows, meta]
        return meta, rows

    def save(self) -> None:
        """Write what this pass served or read, if it differs from what was loaded (best-effort)."""
        if self._used == self._known:
            return
        try:
            atomic_write_bytes(self.path, json.dumps({"format": MEMO_FORMAT, "files": self._used},
                                                     separators=(",", ":")).encode())
        except OSError:
            pass
