"""Finding shards and fingerprinting their content."""

from __future__ import annotations

import shutil

import pytest

from tasks.shards import Refusal, ShardNotFound, find_shards, fingerprint, inbox_shards, read_entries


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


# --- symbolic links are never followed out of the folder ingest is given -------------------------------------------


@pytest.fixture
def elsewhere(tmp_path, png_shard):
    """Another site's folder of images, outside the inbox."""
    other = tmp_path / "other-site" / "scans"
    shutil.copytree(png_shard[0], other)
    return other


def test_a_shard_path_that_is_a_symlink_is_refused(tmp_path, elsewhere, tar_shard):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "scans").symlink_to(elsewhere)
    (inbox / "night.tar").symlink_to(tar_shard[0])
    for pattern in (inbox / "scans", inbox / "night.tar", inbox / "*.tar"):
        with pytest.raises(ShardNotFound, match="is a symbolic link .*does not follow links"):
            find_shards([str(pattern)])


def test_a_folder_of_shards_holding_a_symlink_is_refused_naming_it(tmp_path, tar_shard):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(tar_shard[0], inbox / "real.tar")
    (inbox / "etc.tar").symlink_to(tar_shard[0])
    with pytest.raises(ShardNotFound, match="etc.tar is a symbolic link"):
        find_shards([str(inbox)])


def test_the_inbox_listing_ignores_symlinks_whatever_they_point_at(tmp_path, elsewhere, tar_shard):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(tar_shard[0], inbox / "real.tar")
    (inbox / "other-site").symlink_to(elsewhere)
    (inbox / "zero.npz").symlink_to("/dev/zero")
    shards, ignored = inbox_shards(inbox)
    assert shards == [(inbox / "real.tar").resolve()]
    assert sorted(p.name for p in ignored) == ["other-site", "zero.npz"]


def test_a_link_inside_a_folder_shard_is_never_read_not_even_to_fingerprint_it(png_shard, tmp_path):
    folder = png_shard[0]
    target = tmp_path / "secret.png"
    target.write_bytes(b"outside the shard")
    (folder / "leak.png").symlink_to(target)
    (folder / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    before = fingerprint(folder).sha256
    target.write_bytes(b"changed outside the shard")
    assert fingerprint(folder).sha256 == before  # the link counts by where it points, not what is there
    refusals = {r.entry: r.reason for r in read_entries(fingerprint(folder)) if isinstance(r, Refusal)}
    assert refusals == {"leak.png": "unsafe_path", "zero.png": "unsafe_path"}
