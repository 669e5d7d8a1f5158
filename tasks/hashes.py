"""The lake's index of pixel hashes: which of a shard's images are already in the lake, at a cost of the shard's size.

Ingest refuses an image whose pixels the lake already holds. Reading every landed shard's hashes for that (as ingest
did before this index) costs O(lake) per shard, every night, forever; this index answers the same question with one
B-tree lookup an image. It is `lake/index/hashes.sqlite` (SQLite, standard library: transactions, no server),
and it is a cache of what images/ holds, never the truth: the images files are. So it can always be rebuilt, and
every use first reconciles it with images/ by file name, size and time (a listing, not a read): a shard landed without
being indexed (a kill -9 between the rename and the insert) is indexed from its own file, a shard no longer there
(deleted, replaced) is dropped. All of it runs under the lake's lock, like the commit it serves.

Its rows are small on purpose (the first 16 bytes of the sha256, the shard's number, the image's row in its file:
~55 B an image on disk). A B-tree insert dirties the page its key lands on, and once the lake has more pages than
a shard has images, every image dirties its own: the cost of a commit is then the shard's page writes, whatever the
lake's size, so smaller rows mean fewer, cheaper pages (measured in benchmarks/lake_scale.py: a 2,000-image commit
took 0.095 s into a 1M-image index of full hashes and sources, 0.065 s with these rows). A prefix match is
confirmed against the holder's full hash, read from its images file (only for the images that match: duplicates
are rare, and a re-delivery's are one file's), so the index never calls two different images the same.

Like the lake lock, it needs a filesystem with working POSIX locks (local disk, or NFS with locking) when several
hosts ingest into one lake.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from tasks.lake import IMAGE_IDS_KEY, SHARD_PATH_KEY, Lake, footer

INDEX_FILE = "index/hashes.sqlite"
INDEX_VERSION = 2  # the tables' layout; an index of another is dropped and rebuilt from images/
KEY_BYTES = 16  # of the sha256: 2^-128 a pair; a match is confirmed against the full hash before it is believed
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard (no INTEGER PRIMARY KEY, shard_id TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
                                  mtime_ns INTEGER NOT NULL, path TEXT NOT NULL, ids TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS shard_path ON shard (path);
CREATE TABLE IF NOT EXISTS image (key BLOB PRIMARY KEY, shard INTEGER NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS image_shard ON image (shard);
"""
_BATCH = 500  # bound parameters a query


def _key(sha_hex: str) -> bytes:
    return bytes.fromhex(sha_hex[: 2 * KEY_BYTES])


class HashIndex:
    """The index of one lake (open it with `HashIndex.open(lake)` under the lake's lock)."""

    def __init__(self, lake: Lake, db: sqlite3.Connection) -> None:
        self.lake, self.db = lake, db

    @classmethod
    @contextlib.contextmanager
    def open(cls, lake: Lake) -> Iterator["HashIndex"]:
        """The lake's index, reconciled with images/; the caller holds the lake's lock."""
        path = lake.root / INDEX_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit below
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA user_version").fetchone()[0] != INDEX_VERSION:  # another layout: a cache, rebuilt
                db.executescript("DROP TABLE IF EXISTS image; DROP TABLE IF EXISTS shard;")
                db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
            db.executescript(_SCHEMA)
            index = cls(lake, db)
            index.reconcile()
            yield index
        finally:
            db.close()

    def reconcile(self) -> tuple[list[str], list[str]]:
        """Index the landed shards it does not know (or knows with other images: rewritten), drop the ones no longer
        landed; returns (indexed, dropped). A file whose size and time match is taken as known without reading it;
        one that only moved in time (a copied or restored lake) is checked by the image-id digest in its footer."""
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
        """Index one landed images file (its sha256 column: the shard's size, not the lake's)."""
        hashes = pq.read_table(images_file, columns=["sha256"]).column("sha256").to_pylist()
        stat, meta = images_file.stat(), footer(images_file)
        with self._transaction():
            self.db.execute("DELETE FROM shard WHERE shard_id = ?", (shard_id,))
            no = self.db.execute("INSERT INTO shard (shard_id, size, mtime_ns, path, ids) VALUES (?, ?, ?, ?, ?)",
                                 (shard_id, stat.st_size, stat.st_mtime_ns, meta.get(SHARD_PATH_KEY, ""),
                                  meta.get(IMAGE_IDS_KEY, ""))).lastrowid
            # in key order: the B-tree's pages are visited front to back
            rows = sorted((_key(sha), no, row) for row, sha in enumerate(hashes))
            self.db.executemany("INSERT OR REPLACE INTO image VALUES (?, ?, ?)", rows)

    def forget(self, shard_ids: Iterable[str]) -> None:
        """Drop shards from the index (deleted or replaced)."""
        with self._transaction():
            for shard_id in shard_ids:
                self.db.execute("DELETE FROM image WHERE shard = (SELECT no FROM shard WHERE shard_id = ?)",
                                (shard_id,))
                self.db.execute("DELETE FROM shard WHERE shard_id = ?", (shard_id,))

    def holders(self, hashes: Iterable[str], excluding: Iterable[str] = ()) -> dict[str, str]:
        """sha256 → "shard_id/source" for those of `hashes` already in the lake, but for the shards `excluding`.

        The index proposes by key prefix; each holder's images file confirms by the full hash and names the source
        (one file read per holding shard, for its matching rows only)."""
        excluded, wanted = set(excluding), list(hashes)
        proposed: dict[str, list[tuple[str, int]]] = {}  # holder shard → [(sha, row)]
        by_key = {_key(sha): sha for sha in wanted}
        keys = list(by_key)
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start: start + _BATCH]
            query = (f"SELECT image.key, shard.shard_id, image.row FROM image JOIN shard ON shard.no = image.shard "
                     f"WHERE image.key IN ({','.join('?' * len(chunk))})")
            for key, shard_id, row in self.db.execute(query, chunk):
                if shard_id not in excluded:
                    proposed.setdefault(shard_id, []).append((by_key[key], row))
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
        return self.db.execute("SELECT COUNT(*) FROM image").fetchone()[0]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
