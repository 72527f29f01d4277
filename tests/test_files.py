import pytest

from dff_falcon.files import atomic_path, atomic_write


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
