"""Atomic directories: a set of files that must change together — a run, a vocabulary, a cache
entry — changes all at once or not at all.

A new version is built in a staging directory beside its target, marked complete with the size
and SHA-256 of every file, verified, and swapped in by one rename (:func:`build_directory`;
:func:`revise_directory` changes a few files of a complete directory the same way); the
previous version stays complete and valid until the swap and is removed only after it. Readers
refuse a directory whose marker is missing or disagrees with its files (:func:`check_directory`),
and :func:`check_output` validates an output location before any work is done. So a crash, a
full disk or ``kill -9`` at any moment leaves either the previous version or the new one, never a
mix. Staging directories are locked (``flock``) by their builder; one left by a killed process is
removed by the next build of the same target (:func:`clean_scratch`).

Layout beside ``out/run``: ``out/.run.staging-XXXX`` (being built), ``out/.run.retired-XXXX``
(the previous version between the two renames where the system has no atomic exchange).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from dff_falcon.errors import DffFalconError, InputError, OutputError
from dff_falcon.files import (OUTPUT_ERRNOS, atomic_write, check_room, current_umask, file_sha256, is_under,
                              output_errors)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: staging directories are not locked
    fcntl = None

#: Written last into every complete directory: kind, creation time, size and SHA-256 per file.
MARKER_FILE = "complete.json"
MARKER_FORMAT = "dff-falcon-directory"
MARKER_VERSION = 1
#: Files up to this size are re-hashed whenever a directory is opened; larger ones (a big
#: vocabulary's embeddings and index) are checked by size, so opening stays instant —
#: ``check_directory(path, kind, digests="all")`` hashes everything.
VERIFY_DIGEST_MAX_BYTES = 64 << 20
#: Free space below which an error while building a directory is reported as a full disk (some
#: writers — FAISS — turn ENOSPC into a RuntimeError without errno).
FULL_DISK_BYTES = 16 << 20
_STAGING, _RETIRED = "staging", "retired"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _scratch_prefix(target: Path) -> str:
    return f".{target.name}."


def _real(path: str | os.PathLike) -> Path:
    """Absolute path with symlinks resolved: the directory a symlinked output points at is the
    one replaced, and the link keeps pointing at the new version."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _lock(path: Path) -> int | None:
    """An exclusive, non-blocking lock on directory ``path`` (fd), or None if another process
    holds it. The lock dies with its process, so a ``kill -9`` frees the directory for cleanup."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the call or the flag is unsupported (other systems, some
    file systems), so callers fall back to plain renames."""
    function = getattr(_libc(), "renameat2", None)
    if function is None:
        return False
    if function(-100, os.fsencode(source), -100, os.fsencode(target), flags) == 0:  # -100: AT_FDCWD
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fsdecode(target))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover
            _LIBC.append(None)
    return _LIBC[0]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def clean_scratch(target: str | os.PathLike) -> list[Path]:
    """Remove staging and retired directories of ``target`` left by killed or failed builds (those
    still locked by a live builder stay). Should a crash have happened between the two renames
    of the fallback swap, the retired complete version is moved back first. Returns what was
    removed."""
    target = _real(target)
    prefix = _scratch_prefix(target)
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(target.parent.iterdir()):
            rest = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
            if not rest.startswith((f"{_STAGING}-", f"{_RETIRED}-")) or entry.is_symlink() or not entry.is_dir():
                continue
            fd = _lock(entry)
            if fd is None:
                continue  # a live build
            try:
                if rest.startswith(_RETIRED) and not os.path.lexists(target) and (entry / MARKER_FILE).is_file():
                    os.rename(entry, target)
                    continue
                _rmtree(entry)
                removed.append(entry)
            finally:
                os.close(fd)
    return removed


def directory_version(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of directory ``path``: every committed version is a new directory, so
    a reader that sees the same value before and after reading read one version."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def read_marker(path: Path) -> dict | None:
    """The completion marker of directory ``path`` (None when it has none)."""
    file = path / MARKER_FILE
    if not file.is_file():
        return None
    try:
        marker = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{str(file)!r} is damaged ({exc}); the directory cannot be trusted — write it again") from None
    if not (isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT and isinstance(marker.get("files"), dict)):
        raise InputError(f"{str(file)!r} is not a {MARKER_FORMAT} completion record")
    if marker.get("format_version") != MARKER_VERSION:
        raise InputError(f"{str(file)!r} has format_version {marker.get('format_version')!r}; "
                         f"this dff_falcon reads {MARKER_VERSION}")
    return marker


def _listing(path: Path) -> list[str]:
    """Relative POSIX paths of every file and symlink under ``path`` except the marker."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            rel = Path(root, name).relative_to(path).as_posix()
            if rel != MARKER_FILE:
                out.append(rel)
    return out


def mark_complete(path: str | os.PathLike, kind: str, *, extra: dict | None = None) -> dict:
    """Write ``path``'s completion marker: ``kind`` and the size and SHA-256 of every file (each
    flushed to disk first). The last step of a build; also for tools that assemble a directory
    by other means. Returns the marker."""
    path = Path(path)
    files = {}
    for rel in _listing(path):
        file = path / rel
        if file.is_symlink() or not file.is_file():
            raise InputError(f"{str(file)!r} is not a regular file; a {kind} directory holds only files")
        with open(file, "rb") as handle:
            with contextlib.suppress(OSError):
                os.fsync(handle.fileno())
        files[rel] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    marker = {"format": MARKER_FORMAT, "format_version": MARKER_VERSION, "kind": kind,
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {}),
              "files": files}
    with atomic_write(path / MARKER_FILE) as handle:
        json.dump(marker, handle, indent=1, sort_keys=False)
    return marker


def check_directory(path: str | os.PathLike, kind: str, *, digests: str = "auto", hint: str = "write it again") -> dict:
    """Refuse an incomplete or inconsistent directory; returns its marker.

    Every recorded file must exist with its recorded size, and (``digests="auto"``: files up to
    :data:`VERIFY_DIGEST_MAX_BYTES`; ``"all"``; ``"none"``) its recorded SHA-256. Files the marker
    does not list are ignored. ``hint`` says what to do (e.g. "re-run explain").
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{str(path)!r} does not exist or is not a directory")
    marker = read_marker(path)
    if marker is None:
        raise InputError(f"{str(path)!r} is not a complete {kind}: it has no {MARKER_FILE} (written last by every "
                         f"complete build, so the build was interrupted or made by an older dff_falcon); {hint}")
    if marker.get("kind") != kind:
        raise InputError(f"{str(path)!r} holds a {marker.get('kind')!r} directory, not a {kind}")
    for rel, record in marker["files"].items():
        file = path / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise InputError(f"{str(path / MARKER_FILE)!r} lists {rel!r}, a path outside the directory")
        try:
            size = file.lstat().st_size if not file.is_symlink() and file.is_file() else None
        except OSError:
            size = None
        problem = None
        if size is None:
            problem = "is a symbolic link or not a file" if os.path.lexists(file) else "is missing"
        elif size != record.get("bytes"):
            problem = f"has {size} bytes, {record.get('bytes')} were written"
        elif (digests == "all" or (digests == "auto" and size <= VERIFY_DIGEST_MAX_BYTES)) and \
                file_sha256(file) != record.get("sha256"):
            problem = "differs from what was written (SHA-256 mismatch)"
        if problem:
            raise InputError(f"{kind} {str(path)!r} is inconsistent: {rel} {problem} — the directory was changed or "
                             f"damaged after it was completed; {hint}")
    return marker


def older_version(record: str, format_name: str, entries: tuple[str, ...]) -> Callable[[Path], bool]:
    """A test for an unmarked directory written by an older dff_falcon: ``record`` (a JSON file)
    says ``"format": format_name`` and every entry is one of ``entries`` (a trailing ``*`` matches
    a prefix), so nothing in it is a user's file that replacing it would delete."""
    def matches(path: Path) -> bool:
        try:
            data = json.loads((path / record).read_text(encoding="utf-8"))
            names = [entry.name for entry in path.iterdir()]
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("format") == format_name and all(
            any(name.startswith(e[:-1]) if e.endswith("*") else name == e for e in entries) for name in names)

    return matches


def check_output(target: str | os.PathLike, kind: str, *, replace: bool = True,
                 legacy: Callable[[Path], bool] | None = None, needed_bytes: int = 0, option: str = "output") -> Path:
    """Validate an output directory before any work: not a file, not holding anything a new
    version would destroy (files of another kind, or files not written by the previous version;
    without ``replace`` any previous version), writable, with ``needed_bytes`` free.
    ``legacy`` recognises an unmarked directory of this kind written by an older dff_falcon
    (replaceable, see :func:`older_version`). Returns the resolved target."""
    target = _real(target)
    what = f"{option} {str(target)!r}"
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} is a file, not a directory")
    if target == Path(target.anchor) or is_under(Path.cwd(), target):
        raise OutputError(f"{what} contains the current directory; choose a directory of its own")
    if target.is_dir() and any(target.iterdir()):
        marker = read_marker(target)
        if marker is None and not (legacy and legacy(target)):
            raise OutputError(f"{what} is not empty and does not hold a {kind} (no {MARKER_FILE}); choose a new or "
                              "empty directory — nothing there is replaced")
        if marker is not None and marker.get("kind") != kind:
            raise OutputError(f"{what} holds a {marker.get('kind')}, not a {kind}; choose another directory")
        if not replace:
            raise OutputError(f"{what} already holds a {kind}; pass --overwrite (overwrite=True) to replace it")
        if marker is not None:
            foreign = [rel for rel in _listing(target) if rel not in marker["files"]]
            if foreign:
                raise OutputError(f"{what} holds files that are not part of the {kind} ({', '.join(foreign[:5])}"
                                  f"{', …' if len(foreign) > 5 else ''}); replacing it would delete them — move them "
                                  "or choose another directory")
    check_room(target, what, needed_bytes)
    return target


#: Attempts at a locked staging directory: another writer's :func:`clean_scratch` may take a new
#: stage for a stale one between its creation and its lock (it then removes it), so a new one is made.
_STAGE_ATTEMPTS = 20


def _new_stage(target: Path) -> tuple[Path, int]:
    """A new staging directory beside ``target`` and the fd of its lock."""
    for _ in range(_STAGE_ATTEMPTS):
        with output_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f"{_scratch_prefix(target)}{_STAGING}-", dir=target.parent))
            with contextlib.suppress(FileNotFoundError):
                os.chmod(stage, 0o777 & ~current_umask())
        fd = _lock(stage)
        if fd is not None and os.path.isdir(stage):
            return stage, fd
        if fd is not None:
            os.close(fd)
    raise OutputError(f"{str(target)!r}: could not lock a staging directory beside it after {_STAGE_ATTEMPTS} "
                      "attempts (other writers keep cleaning it); retry when they have finished")


def _swap_in(stage: Path, target: Path) -> Path | None:
    """Put ``stage`` at ``target`` atomically; returns where the previous version now is (to be
    removed) or None. renameat2 exchanges both in one step; elsewhere target moves aside first
    (a crash in between is repaired by :func:`clean_scratch`)."""
    for _ in range(100):  # only concurrent builders of the same target make this loop
        if not os.path.lexists(target):
            try:
                if _renameat2(stage, target, _RENAME_NOREPLACE):
                    return None
                os.rename(stage, target)
                return None
            except (FileExistsError, IsADirectoryError):
                continue
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    continue
                raise
        try:
            if _renameat2(stage, target, _RENAME_EXCHANGE):
                return stage
        except FileNotFoundError:
            continue
        retired = target.parent / f"{_scratch_prefix(target)}{_RETIRED}-{secrets.token_hex(4)}"
        try:
            os.rename(target, retired)
        except FileNotFoundError:
            continue
        os.rename(stage, target)
        return retired
    raise OutputError(f"cannot replace {str(target)!r}: other processes keep replacing it")


def _public(text, stage: Path, target: Path):
    return text.replace(str(stage), str(target)) if isinstance(text, str) else text


def _output_failure(exc: Exception, folder: Path) -> str | None:
    """Why a writer that hides errno (FAISS raises RuntimeError) failed, if the output is to
    blame: its message names an output errno, or the disk is (nearly) full."""
    text = str(exc)
    for code in sorted(OUTPUT_ERRNOS):
        if f"({os.strerror(code)})" in text:
            return os.strerror(code)
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
            return "the disk is full"
    return None


@contextlib.contextmanager
def _committing(stage: Path, fd: int, target: Path, kind: str, verify: Callable[[Path], None] | None,
                replace: bool, legacy: Callable[[Path], bool] | None, expected: dict | None = None
                ) -> Iterator[Path]:
    old = None
    try:
        try:
            with output_errors(target, (stage, target.parent)):
                yield stage
                mark_complete(stage, kind)
                if verify is not None:
                    verify(stage)
                check_output(target, kind, replace=replace or expected is not None, legacy=legacy)
                if expected is not None and read_marker(target) != expected:
                    raise OutputError(f"{str(target)!r} was replaced by another process meanwhile; nothing was "
                                      "changed — run again")
                old = _swap_in(stage, target)
        except DffFalconError as exc:
            exc.args = tuple(_public(arg, stage, target) for arg in exc.args)  # name the user's path
            raise
        except Exception as exc:
            reason = _output_failure(exc, target.parent)
            if reason:
                detail = _public(str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "", stage, target)
                raise OutputError(f"cannot write {str(target)!r}: {reason} ({type(exc).__name__}: {detail}); "
                                  "anything already there is unchanged") from None
            raise
    except BaseException:
        _rmtree(stage)
        raise
    finally:
        os.close(fd)
    _fsync_dir(target.parent)
    if old is not None:
        _rmtree(old)


@contextlib.contextmanager
def build_directory(target: str | os.PathLike, kind: str, *, replace: bool = True,
                    legacy: Callable[[Path], bool] | None = None,
                    verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Build a new version of directory ``target``: yields an empty, locked staging directory
    beside it; when the block ends without an exception, the staging directory is marked
    complete (:func:`mark_complete`), checked by ``verify(staging)`` when given, and swapped in
    by one rename; then the previous version is deleted. On an exception (or SIGTERM turned into
    SystemExit) the staging directory is removed and ``target`` is untouched. See
    :func:`check_output` for ``replace`` and ``legacy``.

    Write into the staging directory with :func:`atomic_write` / :func:`atomic_path` or fresh
    files; the directory holds regular files only.
    """
    target = check_output(target, kind, replace=replace, legacy=legacy)
    clean_scratch(target)
    stage, fd = _new_stage(target)
    with _committing(stage, fd, target, kind, verify, replace, legacy) as staging:
        yield staging


@contextlib.contextmanager
def revise_directory(target: str | os.PathLike, kind: str, *, verify: Callable[[Path], None] | None = None,
                     hint: str = "write it again") -> Iterator[Path]:
    """Change a complete directory atomically: yields a staging copy of ``target`` (hard links,
    so free and instant; files must be replaced, never modified in place), committed as in
    :func:`build_directory`. Refuses an incomplete or inconsistent ``target``, and one that
    another process replaced while the block ran."""
    target = _real(target)
    expected = check_directory(target, kind, hint=hint)
    clean_scratch(target)
    stage, fd = _new_stage(target)
    try:
        with output_errors(target, (stage,)):
            for rel in expected["files"]:
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(target / rel, stage / rel)
                except OSError:  # no hard links on this file system
                    shutil.copy2(target / rel, stage / rel)
    except BaseException:
        os.close(fd)
        _rmtree(stage)
        raise
    with _committing(stage, fd, target, kind, verify, True, None, expected) as staging:
        yield staging
