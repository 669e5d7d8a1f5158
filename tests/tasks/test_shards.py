"""Finding shards and fingerprinting their content."""

from __future__ import annotations

import shutil

import pytest

from tasks.shards import ShardNotFound, find_shards, fingerprint


def test_globs_and_inbox_folders_expand_to_shards(png_shard, npz_shard, tar_shard, tmp_path):
    shards = tmp_path / "shards"
    assert find_shards([str(shards)]) == sorted([png_shard[0], npz_shard[0], tar_shard[0]])
    assert find_shards([str(shards / "*.tar"), str(tar_shard[0])]) == [tar_shard[0]]


@pytest.mark.parametrize("pattern,message", [("nothing-*.tar", "no shard matches"), ("missing.npz", "no such shard")])
def test_missing_paths_are_one_line_errors(tmp_path, pattern, message):
    with pytest.raises(ShardNotFound, match=message):
        find_shards([str(tmp_path / pattern)])


def test_a_file_that_is_not_a_shard_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ShardNotFound, match="not a shard"):
        find_shards([str(tmp_path / "notes.txt")])


def test_fingerprint_depends_on_content_not_path(tar_shard, png_shard, tmp_path):
    copy = tmp_path / "copy.tar"
    shutil.copy(tar_shard[0], copy)
    assert fingerprint(copy).shard_id == fingerprint(tar_shard[0]).shard_id
    folder = png_shard[0]
    before = fingerprint(folder).sha256
    shutil.copytree(folder, tmp_path / "moved")
    assert fingerprint(tmp_path / "moved").sha256 == before
    (folder / "labels.csv").write_text("filename,label\n")
    assert fingerprint(folder).sha256 != before
