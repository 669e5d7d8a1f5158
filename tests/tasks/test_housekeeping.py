"""What a killed run leaves behind is removed by the next one; what a live writer is writing never is."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from screenline.files import _writer, atomic_path, stale_temps, temp_beside
from tasks.housekeeping import sweep_stale_temps
from tasks.lake import Lake


def dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_temps_of_dead_writers_on_this_host_go_and_every_other_file_stays(tmp_path):
    lake = Lake(tmp_path / "lake")
    images = lake.images
    images.mkdir(parents=True)
    host = _writer().split("~")[0]
    dead = images / f".abc.parquet.{host}~{dead_pid()}.0123abcd.tmp"
    staging = images / f".abc.parquet.{host}~{dead_pid()}.0123abcd.tmp.staging"
    live = temp_beside(images / "abc.parquet")  # this process: alive
    other_host = images / f".abc.parquet.another-host~{dead_pid()}.0123abcd.tmp"
    old_format, fresh_old_format = images / ".abc.parquet.0123abcd.tmp", images / ".def.parquet.0123abcd.tmp"
    landed, hidden = images / "0123456789abcdef.parquet", lake.root / ".lock"
    nested = lake.root / "predictions" / "sn-x" / ".superseded" / f".p.parquet.{host}~{dead_pid()}.00000000.tmp"
    nested.parent.mkdir(parents=True)
    for path in (dead, staging, live, other_host, old_format, fresh_old_format, landed, hidden, nested):
        path.write_bytes(b"x")
    a_day_ago = time.time() - 25 * 3600
    os.utime(old_format, (a_day_ago, a_day_ago))
    assert sorted(sweep_stale_temps(lake)) == sorted(str(p) for p in (dead, staging, old_format, nested))
    assert all(p.exists() for p in (live, other_host, fresh_old_format, landed, hidden))
    assert stale_temps(lake.root) == []


def test_a_writer_killed_mid_write_leaves_a_temp_the_next_run_removes(tmp_path):
    out = tmp_path / "lake" / "images" / "0123456789abcdef.parquet"
    script = ("import os, sys, signal; sys.path.insert(0, %r)\n"
              "from pathlib import Path\nfrom screenline.files import atomic_path\n"
              "with atomic_path(Path(%r)) as tmp:\n    tmp.write_bytes(b'half a file')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n") % (os.getcwd(), str(out))
    subprocess.run([sys.executable, "-c", script], check=False)
    (left,) = [p for p in out.parent.iterdir()]
    assert left.name.startswith(".0123456789abcdef.parquet.") and not out.exists()
    assert sweep_stale_temps(Lake(tmp_path / "lake")) == [str(left)] and not left.exists()
    with atomic_path(out) as tmp:  # and a write after it is whole
        tmp.write_bytes(b"a whole file")
    assert out.read_bytes() == b"a whole file" and [p.name for p in out.parent.iterdir()] == [out.name]


def test_a_copy_over_a_file_in_use_is_whole_and_none_at_all_when_it_holds_the_same_bytes(tmp_path, monkeypatch):
    import shutil

    from screenline.files import copy_atomic

    source, target = tmp_path / "new.onnx", tmp_path / "model" / "model.onnx"
    target.parent.mkdir()
    source.write_bytes(b"graph v1")
    target.write_bytes(b"graph v1")
    inode = target.stat().st_ino
    assert copy_atomic(source, target) is False and target.stat().st_ino == inode  # same bytes: not touched
    source.write_bytes(b"graph v2, longer")

    def killed(src, dst):
        open(dst, "wb").write(b"graph v")  # half written, then the process dies
        raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(shutil, "copyfile", killed)
    try:
        copy_atomic(source, target)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert target.read_bytes() == b"graph v1"  # what was there is whole: a promoted model stays loadable
    assert copy_atomic(source, target) is True and target.read_bytes() == b"graph v2, longer"
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]
