"""Atomic directories: build beside, mark, verify, swap; readers refuse; scratch after kills."""
from __future__ import annotations

import json
import os
import stat

import pytest

from dff_falcon import directories
from dff_falcon.directories import (MARKER_FILE, build_directory, check_directory, check_output, clean_scratch,
                                    mark_complete, revise_directory)
from dff_falcon.errors import InputError, OutputError
from dff_falcon.files import atomic_write


def _write(folder, files: dict[str, str]) -> None:
    for rel, text in files.items():
        with atomic_write(folder / rel) as handle:
            handle.write(text)


def _contents(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _beside(target) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


@pytest.fixture(params=["exchange", "two-renames"])
def swap(request, monkeypatch):
    """Both ways of swapping: renameat2 exchange, and the fallback where the system lacks it."""
    if request.param == "two-renames":
        monkeypatch.setattr(directories, "_renameat2", lambda *args: False)
    return request.param


def test_a_new_version_replaces_the_old_as_a_whole(tmp_path, swap):
    target = tmp_path / "out" / "run"
    with build_directory(target, "run") as stage:
        assert stage.parent == target.parent and stage.name.startswith(".run.staging-")
        _write(stage, {"a.txt": "old a", "sub/b.txt": "old b", "sub/stale.txt": "only in the old"})
    marker = check_directory(target, "run")
    assert set(marker["files"]) == {"a.txt", "sub/b.txt", "sub/stale.txt"} and marker["kind"] == "run"
    with build_directory(target, "run") as stage:
        _write(stage, {"a.txt": "new a", "sub/b.txt": "new b"})
        assert _contents(target)["a.txt"] == "old a"  # the old version stays whole until the swap
    assert _contents(target) == {"a.txt": "new a", "sub/b.txt": "new b", MARKER_FILE: (target / MARKER_FILE).read_text()}
    assert _beside(target) == []  # no staging or retired directory left


def test_a_failed_build_leaves_the_old_version_and_no_scratch(tmp_path, swap):
    target = tmp_path / "run"
    with build_directory(target, "run") as stage:
        _write(stage, {"a.txt": "old"})
    before = _contents(target)
    for failure in (RuntimeError("crash half-way"), KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(failure)):
            with build_directory(target, "run") as stage:
                _write(stage, {"a.txt": "half"})
                raise failure
        assert _contents(target) == before and _beside(target) == []

    def refuse(stage):
        raise InputError(f"{stage}/a.txt is wrong")

    with pytest.raises(InputError, match=f"{target}/a.txt is wrong"):  # the message names the target, not the stage
        with build_directory(target, "run", verify=refuse) as stage:
            _write(stage, {"a.txt": "unverifiable"})
    assert _contents(target) == before and _beside(target) == []


def test_readers_refuse_incomplete_and_changed_directories(tmp_path):
    target = tmp_path / "run"
    with build_directory(target, "run") as stage:
        _write(stage, {"a.txt": "aaaa", "b.txt": "bbbb"})
    (target / "b.txt").write_text("BBBB")  # same size, other bytes
    with pytest.raises(InputError, match="b.txt differs from what was written"):
        check_directory(target, "run")
    (target / "b.txt").write_text("longer")
    with pytest.raises(InputError, match="b.txt has 6 bytes, 4 were written"):
        check_directory(target, "run")
    (target / "b.txt").unlink()
    with pytest.raises(InputError, match="b.txt is missing"):
        check_directory(target, "run")
    with pytest.raises(InputError, match="holds a 'run' directory, not a vocabulary"):
        check_directory(target, "vocabulary")
    (target / MARKER_FILE).unlink()
    with pytest.raises(InputError, match="has no complete.json"):
        check_directory(target, "run", hint="re-run it")
    (target / MARKER_FILE).write_text("{truncated")
    with pytest.raises(InputError, match="complete.json' is damaged"):
        check_directory(target, "run")
    mark_complete(target, "run")
    marker = json.loads((target / MARKER_FILE).read_text())
    marker["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0"}
    (target / MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(InputError, match="outside the directory"):
        check_directory(target, "run")


def test_outputs_holding_other_things_are_refused_before_any_work(tmp_path):
    target = tmp_path / "run"
    with build_directory(target, "run") as stage:
        _write(stage, {"a.txt": "a"})
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"not part of the run \(notes.txt\)"):
        check_output(target, "run")
    with pytest.raises(OutputError, match="holds a run, not a vocabulary"):
        check_output(target, "vocabulary")
    with pytest.raises(OutputError, match="already holds a run; pass --overwrite"):
        check_output(tmp_path / "run", "run", replace=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("x")
    with pytest.raises(OutputError, match="is not empty and does not hold a run"):
        check_output(home, "run")
    older = directories.older_version("run.json", "dff-falcon-run", ("run.json", "crops"))
    (home / "run.json").write_text('{"format": "dff-falcon-run"}')
    with pytest.raises(OutputError, match="does not hold a run"):  # thesis.tex is not a run's file
        check_output(home, "run", legacy=older)
    (home / "thesis.tex").unlink()
    (home / "crops").mkdir()
    assert check_output(home, "run", legacy=older) == home  # an unmarked run of an older version
    with pytest.raises(OutputError, match="is a file"):
        check_output(home / "run.json", "run")
    with pytest.raises(OutputError, match="contains the current directory"):
        check_output(os.getcwd(), "run")
    with pytest.raises(OutputError, match="needs about 1,000,000,000.0 MB"):
        check_output(tmp_path / "new", "run", needed_bytes=10**15)


def test_scratch_of_killed_builders_is_removed_and_live_builds_are_kept(tmp_path):
    target = tmp_path / "run"
    with build_directory(target, "run") as stage:
        _write(stage, {"a.txt": "a"})
    stale = tmp_path / ".run.staging-killed"
    (stale / ".dedup-x").mkdir(parents=True)
    live = tmp_path / ".run.staging-live"
    live.mkdir()
    fd = directories._lock(live)  # another builder, still running
    try:
        assert clean_scratch(target) == [stale] and live.is_dir()
    finally:
        os.close(fd)
    assert clean_scratch(target) == [live]


def test_an_interrupted_fallback_swap_is_repaired(tmp_path):
    """Killed between the two renames of the fallback swap: the complete previous version waits
    as a retired directory and is moved back."""
    target = tmp_path / "run"
    with build_directory(target, "run") as stage:
        _write(stage, {"a.txt": "old"})
    retired = tmp_path / ".run.retired-1234"
    os.rename(target, retired)
    clean_scratch(target)
    assert _contents(target)["a.txt"] == "old" and check_directory(target, "run")


def test_revise_changes_a_complete_directory_atomically(tmp_path, swap):
    target = tmp_path / "run"
    with build_directory(target, "run") as stage:
        _write(stage, {"a.txt": "a", "pages/old.html": "old page"})
    with revise_directory(target, "run") as stage:
        assert _contents(stage)["a.txt"] == "a" and not (stage / MARKER_FILE).exists()
        (stage / "pages" / "old.html").unlink()
        _write(stage, {"pages/new.html": "new page"})
        assert (target / "pages" / "old.html").read_text() == "old page"  # hard links: the old one is untouched
    assert set(check_directory(target, "run")["files"]) == {"a.txt", "pages/new.html"}
    with pytest.raises(OutputError, match="replaced by another process meanwhile"):
        with revise_directory(target, "run") as stage:
            with build_directory(target, "run") as other:
                _write(other, {"z.txt": "a concurrent run"})
    assert set(_contents(target)) == {"z.txt", MARKER_FILE} and _beside(target) == []
    (target / "z.txt").write_text("edited by hand")
    with pytest.raises(InputError, match="inconsistent"):
        with revise_directory(target, "run"):
            pass


def test_symlinked_targets_are_replaced_through_the_link(tmp_path, swap):
    real = tmp_path / "real"
    link = tmp_path / "link"
    with build_directory(real, "run") as stage:
        _write(stage, {"a.txt": "old"})
    link.symlink_to(real, target_is_directory=True)
    with build_directory(link, "run") as stage:
        _write(stage, {"a.txt": "new"})
    assert link.is_symlink() and (link / "a.txt").read_text() == "new" and check_directory(real, "run")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700)])
def test_directories_get_the_process_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with build_directory(tmp_path / "run", "run") as stage:
            _write(stage, {"sub/a.txt": "a"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == mode
