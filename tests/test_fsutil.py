"""Atomic outputs: a killed writer's staging copies are removed by the next run, and git ignores them."""

import os
import subprocess
import sys
from pathlib import Path

from pipeline.fsutil import atomic_dir, atomic_file, not_replaceable

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from pipeline.fsutil import atomic_dir, atomic_file, not_replaceable
with atomic_dir(sys.argv[1]) as staging:
    (staging / "images.npy").write_bytes(b"x" * 1000)
    with atomic_file(sys.argv[2]) as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_staging_is_cleaned_by_the_next_run_and_git_ignored(tmp_path):
    target, report = tmp_path / "prepared", tmp_path / "report.json"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), str(report)], env=env)
    assert done.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(".staging-" in name for name in left), left
    project = Path(__file__).parents[1]
    for name in left:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"data/{name}"], cwd=project)
        assert ignored.returncode == 0, f"{name} would show as untracked in git"
    with atomic_dir(target) as staging:
        (staging / "ok").write_text("1")
    with atomic_file(report) as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "report.json"]


def test_a_live_writers_staging_is_left_alone_and_a_lost_output_comes_back(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as staging:
        (staging / "v1").write_text("1")
        with atomic_dir(target):  # another writer of the same target cleans stale staging: not this live one
            pass
        assert staging.is_dir()
    target.rename(tmp_path / ".prepared.old")  # killed between moving the old output away and the new one in
    with atomic_dir(target):
        assert (target / "v1").is_file()  # the previous output is back while the new one is written
    assert not (tmp_path / ".prepared.old").exists()


def test_what_an_output_path_must_not_replace_is_named(tmp_path):
    # lstat only: nothing here is written, so /dev/null is safe to look at.
    (tmp_path / "file.csv").write_text("x")
    (tmp_path / "link.csv").symlink_to(tmp_path / "file.csv")
    os.mkfifo(tmp_path / "pipe")
    assert not_replaceable(tmp_path / "new.csv") is None and not_replaceable(tmp_path / "file.csv") is None
    assert not_replaceable(tmp_path / "link.csv") == "a symbolic link"
    assert not_replaceable(tmp_path) == "a folder" and not_replaceable(tmp_path / "pipe") == "a FIFO"
    assert not_replaceable(Path("/dev/null")) == "a character device"
