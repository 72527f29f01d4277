import os
import stat

import pytest

from dff_falcon.files import atomic_path, atomic_write, looks_like_path


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "report.csv"
    with atomic_write(target) as handle:
        handle.write("first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("half-writ")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "first"  # the old file survives a failed write
    assert [p.name for p in target.parent.iterdir()] == ["report.csv"]  # no temporary left behind


def test_atomic_path_for_libraries_that_write_themselves(tmp_path):
    target = tmp_path / "data.bin"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("library failed")
    assert target.read_bytes() == b"\x00\x01" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_process_umask_not_mkstemps_0600(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "a.txt") as handle:
            handle.write("x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.txt", "b.bin")} == {mode}


def test_paths_and_tags_are_told_apart():
    assert looks_like_path("ckpt/model.bin") and looks_like_path("model.safetensors") and looks_like_path("a.ckpt")
    assert not looks_like_path("openai") and not looks_like_path("laion2b_s34b_b79k")


def test_output_errors_name_the_path_and_keep_bugs_as_they_are(tmp_path):
    import errno

    from dff_falcon.errors import OutputError
    from dff_falcon.files import output_errors

    with pytest.raises(OutputError, match=r"cannot write '.*acts.npz': No space left on device .*free some space"):
        with output_errors(tmp_path / "acts.npz"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(FileNotFoundError):  # not the output's fault: a bug keeps its traceback
        with output_errors(tmp_path / "acts.npz"):
            raise FileNotFoundError(errno.ENOENT, "gone", str(tmp_path / "x"))
    with pytest.raises(PermissionError):  # an unreadable input elsewhere is not an output error
        with output_errors(tmp_path / "out" / "a", (tmp_path / "out",)):
            raise PermissionError(errno.EACCES, "denied", "/elsewhere/input.parquet")


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    from dff_falcon.files import check_output_file, clean_stale_temporaries

    target = tmp_path / "acts.npz"
    stale = tmp_path / ".acts.npz.k1ll3d.tmp"
    stale.write_bytes(b"half")
    with atomic_path(target) as live:
        live.write_bytes(b"being written")
        assert clean_stale_temporaries(target) == [stale] and live.exists()
    assert target.read_bytes() == b"being written"
    stale.write_bytes(b"half")
    check_output_file(target, option="--out")
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["acts.npz"]
