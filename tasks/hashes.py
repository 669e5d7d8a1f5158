"""The lake's index of pixel hashes: which of a shard's images are already in the lake, at a cost of the shard's size.

Ingest refuses an image whose pixels the lake already holds. Reading every landed shard's hashes for that (as ingest
did once) costs O(lake) per shard, every night, forever; so did the B-tree index that came next, in another way:
2,000 random keys dirty ~2,000 pages of a 1M-key B-tree and a handful of a 10k one (a commit 0.17 s against 0.02 s,
measured apart), and a commit writes each page twice (journal, then the file).

So the index is log-structured, like an LSM tree: sorted runs, written once, never updated in place.

    lake/index/runs/<name>.npy   a sorted run: a 2 × n uint64 array, row 0 the keys (the sha256's first 8 bytes),
                                 row 1 where each image is ((shard number << 32) | its row in the shard's file)
    lake/index/hashes.sqlite     the shards it indexes (number, id, file size and time, delivery path) and its runs

A landed shard adds one run of its own keys (a 32 KB file for 2,000 images, written whole and renamed into place,
then registered in the same SQLite transaction as the shard). When `FANOUT` runs of one level exist they are merged
into one of the next (sorted, dropping rows of shards no longer indexed), so a lake of n images in shards of s holds
at most (FANOUT - 1) runs a level over log_FANOUT(n / s) levels, and each image is rewritten once a level: a
night's cost is its shard's plus an amortised share of merging that grows with the log of the lake, not with the
lake. A lookup is a binary search of the night's keys in each run (memory-mapped: nothing is read but the pages
searched). Forgetting a shard deletes its row in SQLite; its keys stay in their runs, dead (a row whose shard number
is not indexed is skipped), until a merge drops them. Shard numbers are never reused (AUTOINCREMENT).

It is a cache of what images/ holds, never the truth: the images files are. So it can always be rebuilt, and every
use first reconciles it with images/ by file name, size and time (a listing, not a read): a shard landed without
being indexed (a kill -9 between the rename and the insert) is indexed from its own file, a shard no longer there
(deleted, replaced) is dropped, a run file not registered (a kill -9 before the commit, or after a merge's commit)
is deleted, and a registered run that is missing or of the wrong size (a hand, a disk) has the whole index rebuilt.
A key match is confirmed against the holder's full hash, read from its images file (only for the images that match:
duplicates are rare, and a re-delivery's are one file's), so the index never calls two different images the same.
All of it runs under the lake's lock, like the commit it serves. Like the lake lock, it needs a filesystem with
working POSIX locks (local disk, or NFS with locking) when several hosts ingest into one lake. Runs are read with
`np.load(allow_pickle=False)`: no pickles from the lake.
"""

from __future__ import annotations

import contextlib
import io
import sqlite3
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq

from screenline.files import atomic_write_bytes
from tasks.lake import IMAGE_IDS_KEY, SHARD_PATH_KEY, Lake, footer

INDEX_FILE = "index/hashes.sqlite"
RUNS_DIR = "index/runs"
INDEX_VERSION = 3  # the layout; an index of another is dropped and rebuilt from images/ (2: a B-tree of keys)
KEY_BYTES = 8  # of the sha256: a false match is confirmed against the full hash before it is believed
FANOUT = 8  # runs of one level merged into one of the next
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard (no INTEGER PRIMARY KEY AUTOINCREMENT, shard_id TEXT NOT NULL UNIQUE,
                                  size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, path TEXT NOT NULL,
                                  ids TEXT NOT NULL, images INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS shard_path ON shard (path);
CREATE TABLE IF NOT EXISTS run (name TEXT PRIMARY KEY, level INTEGER NOT NULL, bytes INTEGER NOT NULL);
"""


def keys_of(hashes: Iterable[str]) -> np.ndarray:
    """The index keys of sha256 hex digests: their first KEY_BYTES bytes as unsigned integers."""
    hexes = [sha[: 2 * KEY_BYTES].ljust(16, "0") for sha in hashes]
    if not hexes:
        return np.zeros(0, np.uint64)
    return np.frombuffer(bytes.fromhex("".join(hexes)), ">u8").astype(np.uint64)


def _sorted_run(keys: np.ndarray, where: np.ndarray) -> np.ndarray:
    order = np.lexsort((where, keys))
    return np.stack([keys[order], where[order]])


class HashIndex:
    """The index of one lake (open it with `HashIndex.open(lake)` under the lake's lock)."""

    def __init__(self, lake: Lake, db: sqlite3.Connection) -> None:
        self.lake, self.db = lake, db
        self.runs = lake.root / RUNS_DIR

    @classmethod
    @contextlib.contextmanager
    def open(cls, lake: Lake) -> Iterator["HashIndex"]:
        """The lake's index, reconciled with images/; the caller holds the lake's lock."""
        path = lake.root / INDEX_FILE
        (lake.root / RUNS_DIR).mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit below
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            index = cls(lake, db)
            if db.execute("PRAGMA user_version").fetchone()[0] != INDEX_VERSION:  # another layout: a cache, rebuilt
                index._drop()
            db.executescript(_SCHEMA)
            if not index._runs_intact():
                index._drop()
                db.executescript(_SCHEMA)
            index.reconcile()
            yield index
        finally:
            db.close()

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Index the landed shards it does not know (or knows with other images: rewritten), drop the ones no longer
        landed, delete run files it does not hold; returns (indexed, dropped). A file whose size and time match is
        taken as known without reading it; one that only moved in time (a copied or restored lake) is checked by
        the image-id digest in its footer."""
        registered = {name for (name,) in self.db.execute("SELECT name FROM run")}
        for file in self.runs.glob("*.npy"):
            if file.name not in registered:
                file.unlink(missing_ok=True)
        landed = {f.stem: f for f in self.lake.shard_files()}
        known = {sid: rest for sid, *rest in self.db.execute("SELECT shard_id, size, mtime_ns, ids FROM shard")}
        fresh, stale = [], [sid for sid in known if sid not in landed]
        for shard_id, file in landed.items():
            stat = file.stat()
            if shard_id not in known:
                fresh.append(shard_id)
                continue
            size, mtime, ids = known[shard_id]
            if (stat.st_size, stat.st_mtime_ns) == (size, mtime):
                continue
            if stat.st_size == size and footer(file).get(IMAGE_IDS_KEY) == ids:  # the same images, touched
                with self._transaction():
                    self.db.execute("UPDATE shard SET mtime_ns = ? WHERE shard_id = ?", (stat.st_mtime_ns, shard_id))
                continue
            stale.append(shard_id)
            fresh.append(shard_id)
        if stale:
            self.forget(stale)
        for shard_id in fresh:
            self.add(shard_id, landed[shard_id])
        return fresh, [sid for sid in stale if sid not in landed]

    def add(self, shard_id: str, images_file: Path) -> None:
        """Index one landed images file: a run of its keys (the shard's size, not the lake's), merged with others
        of its level when there are FANOUT of them."""
        hashes = pq.read_table(images_file, columns=["sha256"]).column("sha256").to_pylist()
        stat, meta = images_file.stat(), footer(images_file)
        obsolete: list[str] = []
        with self._transaction():
            self.db.execute("DELETE FROM shard WHERE shard_id = ?", (shard_id,))
            no = self.db.execute(
                "INSERT INTO shard (shard_id, size, mtime_ns, path, ids, images) VALUES (?, ?, ?, ?, ?, ?)",
                (shard_id, stat.st_size, stat.st_mtime_ns, meta.get(SHARD_PATH_KEY, ""),
                 meta.get(IMAGE_IDS_KEY, ""), len(hashes))).lastrowid
            where = (np.uint64(no) << np.uint64(32)) | np.arange(len(hashes), dtype=np.uint64)
            self._write_run(_sorted_run(keys_of(hashes), where), level=0)
            level = 0
            while len(names := self._level(level)) >= FANOUT:
                obsolete += names
                self._merge(names, level + 1)
                level += 1
        for name in obsolete:  # after the commit: a kill -9 before this leaves files the next reconcile deletes
            (self.runs / name).unlink(missing_ok=True)

    def forget(self, shard_ids: Iterable[str]) -> None:
        """Drop shards from the index (deleted or replaced): their keys in the runs are dead from now on."""
        with self._transaction():
            self.db.executemany("DELETE FROM shard WHERE shard_id = ?", [(sid,) for sid in shard_ids])

    def holders(self, hashes: Iterable[str], excluding: Iterable[str] = ()) -> dict[str, str]:
        """sha256 → "shard_id/source" for those of `hashes` already in the lake, but for the shards `excluding`.

        The runs propose by key; each holder's images file confirms by the full hash and names the source (one
        file read per holding shard, for its matching rows only)."""
        excluded, wanted = set(excluding), list(hashes)
        live = {no: sid for no, sid in self.db.execute("SELECT no, shard_id FROM shard") if sid not in excluded}
        queries = keys_of(wanted)
        order = np.argsort(queries, kind="stable")
        queries = queries[order]
        proposed: dict[str, list[tuple[str, int]]] = {}  # holder shard → [(sha, row)]
        for run in self._loaded(name for (name,) in self.db.execute("SELECT name FROM run")):
            keys = run[0]
            first, last = np.searchsorted(keys, queries, "left"), np.searchsorted(keys, queries, "right")
            for q in np.flatnonzero(last > first):
                for where in run[1][first[q]:last[q]].tolist():
                    if (shard_id := live.get(where >> 32)) is not None:
                        proposed.setdefault(shard_id, []).append((wanted[order[q]], where & 0xFFFFFFFF))
        found = {}
        for shard_id, matches in proposed.items():
            table = pq.read_table(self.lake.image_file(shard_id), columns=["sha256", "source"])
            shas, sources = table.column("sha256"), table.column("source")
            for sha, row in matches:
                if row < len(table) and shas[row].as_py() == sha:
                    found[sha] = f"{shard_id}/{sources[row].as_py()}"
        return found

    def delivered_from(self, path: str) -> list[str]:
        """The landed shards delivered from `path` (as ingest recorded it)."""
        return [sid for (sid,) in self.db.execute("SELECT shard_id FROM shard WHERE path = ?", (path,))]

    def hashes_of(self, shard_id: str) -> set[str]:
        """The pixel hashes one landed shard holds (from its images file: the index keeps only their prefixes)."""
        return set(pq.read_table(self.lake.image_file(shard_id), columns=["sha256"]).column("sha256").to_pylist())

    def size(self) -> int:
        """Images indexed (in the shards it indexes)."""
        return self.db.execute("SELECT COALESCE(SUM(images), 0) FROM shard").fetchone()[0]

    def levels(self) -> dict[int, int]:
        """Runs a level."""
        return dict(self.db.execute("SELECT level, COUNT(*) FROM run GROUP BY level ORDER BY level"))

    # --- runs ------------------------------------------------------------------------------------------------------

    def _level(self, level: int) -> list[str]:
        return [name for (name,) in self.db.execute("SELECT name FROM run WHERE level = ? ORDER BY name", (level,))]

    def _loaded(self, names: Iterable[str]) -> Iterator[np.ndarray]:
        for name in names:
            yield np.load(self.runs / name, mmap_mode="r", allow_pickle=False)

    def _write_run(self, run: np.ndarray, level: int) -> None:
        """A run file written whole and renamed into place, registered in the open transaction."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(run, np.uint64), allow_pickle=False)
        name = f"{level}-{uuid.uuid4().hex}.npy"
        atomic_write_bytes(self.runs / name, buffer.getvalue())
        self.db.execute("INSERT INTO run (name, level, bytes) VALUES (?, ?, ?)", (name, level, buffer.tell()))

    def _merge(self, names: list[str], level: int) -> None:
        """One run of `level` from `names` (unregistered in the open transaction), without the rows of shards no
        longer indexed."""
        live = np.fromiter((no for (no,) in self.db.execute("SELECT no FROM shard")), np.uint64)
        merged = np.concatenate(list(self._loaded(names)), axis=1)
        merged = merged[:, np.isin(merged[1] >> np.uint64(32), live)]
        self.db.executemany("DELETE FROM run WHERE name = ?", [(name,) for name in names])
        self._write_run(_sorted_run(merged[0], merged[1]), level)

    def _runs_intact(self) -> bool:
        """Every registered run is there, at the size it was written."""
        for name, size in self.db.execute("SELECT name, bytes FROM run"):
            file = self.runs / name
            if not file.is_file() or file.stat().st_size != size:
                return False
        return True

    def _drop(self) -> None:
        """An empty index of this layout (the old one's tables and runs gone; reconcile then rebuilds it)."""
        # (dropping an AUTOINCREMENT table drops its sequence: numbers start again, with no run left to hold one)
        self.db.executescript("DROP TABLE IF EXISTS image; DROP TABLE IF EXISTS shard; DROP TABLE IF EXISTS run;")
        self.db.execute("VACUUM")  # the old layout's pages back to the disk
        self.db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
        for file in self.runs.glob("*.npy"):
            file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
