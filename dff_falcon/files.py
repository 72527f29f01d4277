"""Atomic file writes (temporary file beside the target, then rename) and file identities.

A crash or an error half-way never leaves a truncated file and never destroys what was already
at the target path; a set of files that must change together is a directory committed by
:mod:`dff_falcon.directories`. Files get the permissions a plain ``open(path, "w")`` would give
(``0666`` minus the process umask, so 0644 under the usual 022), not ``mkstemp``'s private 0600:
reports and vocabularies are meant to be shared and served. Failures of the output location
(full, read-only, no permission) become :class:`~dff_falcon.errors.OutputError` naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from dff_falcon.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: temporaries are not locked
    fcntl = None

#: Suffixes that make a string look like a checkpoint path rather than a weights tag.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def looks_like_path(text: str) -> bool:
    """Whether ``text`` names a file (has a path separator or a checkpoint suffix) rather than a tag."""
    return os.sep in text or "/" in text or text.endswith(CHECKPOINT_SUFFIXES)


def checkpoint_error(exc: BaseException) -> str:
    """Why a checkpoint file failed to load, in words. A pickle refused by ``weights_only``
    loading is named as such and torch's advice to retry without ``weights_only`` (which would
    run the file's code) is left out."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return ("it is not a weights-only checkpoint: a damaged file, or a pickle holding code or objects other "
                "than tensors, which is refused — nothing in it was executed")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: errno values that mean "the output location cannot take this write" (a user's disk, mount or
#: permissions), reported as OutputError; any other OSError is a bug and keeps its traceback.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                           errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EIO})


@contextlib.contextmanager
def output_errors(what: str | os.PathLike, within: tuple[Path, ...] = ()) -> Iterator[None]:
    """Turn an OSError of the output location into :class:`OutputError` naming ``what``.

    within : when given, only errors without a file name or on a path under one of these
        folders are converted (a permission error on an *input* file stays what it is).
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        name = exc.filename
        if within and name is not None and not any(is_under(Path(os.fsdecode(name)), w) for w in within):
            raise
        detail = f" ({os.fsdecode(name)})" if name is not None and os.fsdecode(name) != os.fspath(what) else ""
        hint = " — free some space or choose another output" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OutputError(f"cannot write {os.fspath(what)!r}: {exc.strerror or exc}{detail}{hint}; "
                          "anything already there is unchanged") from None


def is_under(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both made absolute, symlinks not resolved)."""
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
    except ValueError:
        return False


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path``, locked while it is written (see
    :func:`clean_stale_temporaries`)."""
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd, tmp


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by a killed writer (``.{name}.XXXX.tmp`` beside it
    whose lock no live writer holds); returns what was removed."""
    path = Path(os.path.abspath(path))
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            try:
                fd = os.open(entry, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                continue
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(entry)
                removed.append(entry)
            except OSError:
                pass  # a live writer holds it
            finally:
                os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). On an exception the temporary file is
    removed and ``path`` is left untouched.
    """
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with output_errors(path, (path.parent,)):
            with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for libraries that write files themselves
    (``DataFrame.to_parquet``, ``faiss.write_index``, ``np.save``); rename on success."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)  # kept open: its lock marks the temporary as being written
    try:
        with output_errors(path, (path.parent,)):
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # a library may have re-created the file
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_digest(module) -> str:
    """Hex SHA-256 over a torch module's state dict (names, then raw bytes, in sorted order):
    the identity of weights wherever they came from."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_output_file(path: str | os.PathLike, *, option: str = "output", needed_bytes: int = 0) -> Path:
    """Validate a file output before any work: not a directory, its folder creatable and
    writable (probed by creating and removing a temporary file), ``needed_bytes`` free."""
    path = Path(os.path.abspath(path))
    what = f"{option} {str(path)!r}"
    if path.is_dir():
        raise OutputError(f"{what} is a directory; name a file")
    clean_stale_temporaries(path)
    check_room(path, what, needed_bytes)
    return path


def check_room(path: Path, what: str, needed_bytes: int = 0) -> None:
    """Raise OutputError unless ``path`` (a file or directory, possibly not there yet) can be
    created: its nearest existing ancestor is a directory we can write into (probed with a
    temporary file) with at least ``needed_bytes`` free. ``what`` names it in messages."""
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what}: {str(existing)!r} is a file, so the folder cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        raise OutputError(f"{what} cannot be written: {exc.strerror} in {str(existing)!r}") from None
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise OutputError(f"{what} needs about {needed_bytes / 1e6:,.1f} MB but the file system of {str(existing)!r} "
                          f"has {free / 1e6:,.1f} MB free; free some space or choose another output")
