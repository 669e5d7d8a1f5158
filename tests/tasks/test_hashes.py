"""The lake's index of pixel hashes: duplicates across shards found in O(shard), and never wrong about the lake,
whatever a kill -9 or a hand left behind (it is reconciled with images/ on every use)."""

from __future__ import annotations

import pytest

from helpers import images, lake_rows
from tasks.hashes import INDEX_FILE, HashIndex
from tasks.ingest import IngestOptions, ingest_shard
from tasks.lake import Lake
from tasks.samples import write_tar
from tasks.shards import fingerprint


def land(path, lake: Lake):
    return ingest_shard(fingerprint(path), lake, IngestOptions(channels=1))


@pytest.fixture
def two_shards(tmp_path):
    """a: images 0-9; b: images 5-14 (5 of them a's)."""
    x, y = images(15, "index-pool", prevalence=0.5)
    write_tar(tmp_path / "a.tar", x[:10], y[:10], prefix="a")
    write_tar(tmp_path / "b.tar", x[5:], y[5:], prefix="b")
    lake = Lake(tmp_path / "lake")
    lake.ensure_channels(1)
    return lake, tmp_path / "a.tar", tmp_path / "b.tar"


def test_duplicates_across_shards_are_found_by_the_index_and_name_their_shard(two_shards):
    lake, a, b = two_shards
    first = land(a, lake)
    second = land(b, lake)
    assert second.accepted == 5 and second.reasons == {"duplicate": 5}
    details = lake_rows(lake.root, "rejects")["detail"]
    assert all(f"of shard {first.shard_id}, already in the lake" in d for d in details)
    with lake.lock(), HashIndex.open(lake) as index:
        assert index.size() == 15 and index.delivered_from(str(a)) == [first.shard_id]


def test_a_shard_landed_but_not_indexed_before_a_kill_is_indexed_by_the_next_commit(two_shards, monkeypatch):
    lake, a, b = two_shards

    def killed(self, shard_id, images_file):
        raise KeyboardInterrupt("kill -9 between landing the file and indexing it")

    monkeypatch.setattr(HashIndex, "add", killed)
    with pytest.raises(KeyboardInterrupt):
        land(a, lake)
    monkeypatch.undo()
    assert len(lake_rows(lake.root)["image_id"]) == 10  # landed, not indexed
    second = land(b, lake)
    assert second.reasons == {"duplicate": 5}  # the index caught up from images/ before it answered


def test_a_shard_deleted_by_hand_is_forgotten_and_its_images_land_again(two_shards):
    lake, a, b = two_shards
    first = land(a, lake)
    lake.image_file(first.shard_id).unlink()  # what the corrupt-file advice has a user do
    second = land(b, lake)
    assert second.accepted == 10 and not second.reasons  # a's images are not in the lake any more


def test_the_index_is_a_cache_deleting_it_rebuilds_it_from_images(two_shards):
    lake, a, b = two_shards
    land(a, lake)
    (lake.root / INDEX_FILE).unlink()
    assert land(b, lake).reasons == {"duplicate": 5}
    with lake.lock(), HashIndex.open(lake) as index:
        assert index.size() == 15


def test_a_copied_lake_is_not_indexed_again_but_a_rewritten_shard_is(two_shards, monkeypatch):
    import os

    lake, a, b = two_shards
    first = land(a, lake)
    file = lake.image_file(first.shard_id)
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))  # as a copy or a restore leaves it
    added = []
    real = HashIndex.add
    monkeypatch.setattr(HashIndex, "add", lambda self, sid, f: added.append(sid) or real(self, sid, f))
    with lake.lock(), HashIndex.open(lake):
        pass
    assert added == []  # the same images: its footer's digest says so, nothing re-read
    again = ingest_shard(fingerprint(a), lake, IngestOptions(channels=1, subset="holdout"))  # rewritten: relanded
    assert again.status == "replaced" and added == [first.shard_id]


def test_a_key_prefix_match_is_confirmed_by_the_full_hash_before_it_is_called_a_duplicate(two_shards, monkeypatch,
                                                                                         tmp_path):
    from tasks import hashes

    lake, a, _ = two_shards
    monkeypatch.setattr(hashes, "KEY_BYTES", 0)  # every image's key is the same: every lookup proposes a holder
    land(a, lake)
    x, y = images(10, "index-other", prevalence=0.5)
    write_tar(tmp_path / "c.tar", x, y, prefix="c")
    other = land(tmp_path / "c.tar", lake)
    assert other.accepted == 10 and not other.reasons  # proposed by the prefix, refuted by the holder's file


@pytest.fixture
def small_shards(tmp_path):
    """Six 3-image shards of distinct images, as tars, and a seventh holding the first image of each of the first
    five and one new: (lake, [paths], mixed path)."""
    x, y = images(19, "index-runs", prevalence=0.5)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"s{i}.tar")
        write_tar(paths[-1], x[3 * i: 3 * i + 3], y[3 * i: 3 * i + 3], prefix=f"s{i}")
    picks = [0, 3, 6, 9, 12, 18]
    write_tar(tmp_path / "mixed.tar", x[picks], y[picks], prefix="mixed")
    lake = Lake(tmp_path / "lake")
    lake.ensure_channels(1)
    return lake, paths, tmp_path / "mixed.tar"


def test_runs_merge_level_by_level_and_still_find_every_duplicate(small_shards, monkeypatch):
    from tasks import hashes

    lake, paths, mixed = small_shards
    monkeypatch.setattr(hashes, "FANOUT", 2)
    for path in paths[:5]:
        land(path, lake)
    with lake.lock(), HashIndex.open(lake) as index:
        assert index.levels() == {0: 1, 2: 1}  # 5 shards, merged in twos: 0b101
        assert index.size() == 15
    assert sorted(p.name.split("-")[0] for p in (lake.root / hashes.RUNS_DIR).glob("*.npy")) == ["0", "2"]
    # one image of each shard: four in the run merged twice, one in the level-0 run
    assert land(mixed, lake).reasons == {"duplicate": 5}


def test_a_merge_drops_the_keys_of_shards_no_longer_in_the_lake(small_shards, monkeypatch):
    import numpy as np

    from tasks import hashes

    lake, paths, _ = small_shards
    monkeypatch.setattr(hashes, "FANOUT", 2)
    first = land(paths[0], lake)
    lake.image_file(first.shard_id).unlink()  # forgotten by the next commit; its keys dead in their run
    land(paths[1], lake)  # the second level-0 run: merged with the first, without its dead keys
    (run,) = (lake.root / hashes.RUNS_DIR).glob("*.npy")
    assert np.load(run, allow_pickle=False).shape == (2, 3)
    assert land(paths[0], lake).accepted == 3  # its images are not in the lake any more


def test_a_run_lost_by_hand_rebuilds_the_index_and_an_unregistered_one_is_deleted(two_shards):
    from tasks import hashes

    lake, a, b = two_shards
    land(a, lake)
    runs = lake.root / hashes.RUNS_DIR
    (run,) = runs.glob("*.npy")
    run.unlink()  # the index would miss a's images
    stray = runs / "0-from-a-killed-commit.npy"
    stray.write_bytes(b"not registered")
    assert land(b, lake).reasons == {"duplicate": 5}
    assert not stray.exists()
    with lake.lock(), HashIndex.open(lake) as index:
        assert index.size() == 15 and index.levels() == {0: 2}


def test_an_index_of_the_older_layout_is_rebuilt(two_shards):
    import sqlite3

    lake, a, b = two_shards
    land(a, lake)
    db = sqlite3.connect(lake.root / INDEX_FILE)
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    assert land(b, lake).reasons == {"duplicate": 5}
    with lake.lock(), HashIndex.open(lake) as index:
        assert index.size() == 15 and index.levels() == {0: 2}
