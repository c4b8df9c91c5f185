"""Outputs that are all or nothing: built under a temporary name, then moved into place.

* A new output is created exclusively: the temporary file or folder is renamed onto the target
  name with ``renameat2(RENAME_NOREPLACE)``, so of two writers racing to one name exactly one
  wins and the other gets :class:`CheckpointError` ("output exists").
* ``overwrite`` replaces an existing output as a whole: a folder is exchanged with the new one
  (``renameat2(RENAME_EXCHANGE)``) and the old one removed, so no stale file survives; a
  symbolic link is replaced itself, never the file or folder it points to.
* Temporaries are named ``.lopt-tmp-<pid>-<random>-<name>`` beside the target and removed on
  any error, on SIGINT and on SIGTERM. A writer killed outright (SIGKILL) leaves its temporary;
  the next write to the same folder removes temporaries whose writer is provably gone.
* Any ``OSError`` while writing (no space left, a read-only folder, a parent that is a file)
  becomes a :class:`CheckpointError` naming the output.

Where ``renameat2`` is unavailable (not Linux, or a file system without it) the fallback is a
hard link for files (still exclusive) and, for folders, a check followed by ``rename`` (not
atomic against a racing writer) and a move-aside for the exchange.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from converters.errors import CheckpointError

TMP_PREFIX = ".lopt-tmp-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-[0-9a-f]+-")
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: Slack (seconds) when comparing a temporary's age to a process's start: the boot time in
#: ``/proc/stat`` is in whole seconds.
_START_SLACK = 2.0
_EXISTS = "output exists (use overwrite / --force to replace it)"


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename2(src: str, dst: str, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


def _move_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` where ``dst`` exists (even an empty
    folder or a dangling link)."""
    if _rename2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.isdir(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        os.rename(src, dst)
        return
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def _remove(path: str) -> None:
    """Remove a file, link or folder tree; nothing if it is gone."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _tmp_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}")


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from ``/proc``; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _writer_gone(pid: int, mtime: float) -> bool:
    """Whether the writer ``pid`` of a temporary last modified at ``mtime`` is provably gone:
    no such process, or the live process of that number started after the temporary was
    written (the number was reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    start = _process_start(pid)
    return start is not None and mtime < start - _START_SLACK


def clean_stale_temporaries(directory: str) -> list[str]:
    """Remove the temporaries in ``directory`` left by writers that are gone; returns them.

    A temporary of a live writer (this process included) is never touched.
    """
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in sorted(entries):
        match = _TMP_NAME.match(entry)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        path = os.path.join(directory, entry)
        try:
            mtime = os.lstat(path).st_mtime
        except FileNotFoundError:
            continue
        if _writer_gone(int(match.group(1)), mtime):
            _remove(path)
            removed.append(path)
    return removed


class _Terminated(SystemExit):
    """SIGTERM during a write: unwinds like ``sys.exit(128 + SIGTERM)``."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(128 + signum)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Make SIGTERM (and SIGINT where it is at its default) raise during the block, so the
    temporaries are removed; the previous handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _os_errors(path: str) -> Iterator[None]:
    """An ``OSError`` in the block becomes a :class:`CheckpointError` naming ``path``."""
    try:
        yield
    except FileExistsError:
        raise CheckpointError(_EXISTS, file=path) from None
    except OSError as e:
        raise CheckpointError(f"cannot write the output ({e.strerror or e})", file=path) from None


def _prepare(path: str, overwrite: bool) -> str:
    """Refuse an existing output without ``overwrite``; make and clean the parent folder."""
    if os.path.islink(path) and not overwrite:
        raise CheckpointError("output exists as a symbolic link (use overwrite / --force to "
                              "replace the link itself)", file=path)
    if os.path.lexists(path) and not overwrite:
        raise CheckpointError(_EXISTS, file=path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError("cannot write the output (a folder on its path is a file)",
                              file=path) from None
    clean_stale_temporaries(parent)
    return parent


@contextlib.contextmanager
def atomic_target(path: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary path to write; on a clean exit it is moved to ``path`` (exclusively,
    or replacing a file or link with ``overwrite``), on any error or signal it is removed."""
    with _os_errors(path), _signals_unwind():
        if os.path.isdir(path) and not os.path.islink(path):
            raise CheckpointError("output is a directory", file=path)
        tmp = _tmp_path(_prepare(path, overwrite), os.path.basename(path))
        try:
            with open(tmp, "xb"):
                pass
            yield tmp
            if overwrite:
                os.replace(tmp, path)
            else:
                _move_noreplace(tmp, path)
        finally:
            _remove(tmp)


def _replace_folder(new: str, target: str) -> None:
    """Put the folder ``new`` at ``target`` (a folder or link that may exist) as a whole; the
    old one ends up at ``new``'s name, for the caller to remove."""
    if not os.path.lexists(target):
        _move_noreplace(new, target)
        return
    try:
        if _rename2(new, target, _RENAME_EXCHANGE):
            return
    except FileNotFoundError:  # removed since: a plain creation will do
        _move_noreplace(new, target)
        return
    aside = new + ".old"
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)


def write_files_atomic(directory: str, files: Mapping[str, Callable[[str], None]],
                       overwrite: bool) -> list[str]:
    """Write a folder of files with ``writer(tmp_path)`` each, as a whole or not at all.

    The folder is built under a temporary name beside ``directory``, then renamed onto it
    exclusively; with ``overwrite`` an existing folder (or link) is exchanged with it and the
    old one removed, so no file of the old folder survives.
    """
    with _os_errors(directory), _signals_unwind():
        if os.path.isfile(directory) and not os.path.islink(directory):
            raise CheckpointError("output exists and is not a directory", file=directory)
        tmpdir = _tmp_path(_prepare(directory, overwrite), os.path.basename(directory))
        try:
            os.mkdir(tmpdir)
            for name, writer in files.items():
                writer(os.path.join(tmpdir, name))
            if overwrite:
                _replace_folder(tmpdir, directory)
            else:
                _move_noreplace(tmpdir, directory)
        finally:
            _remove(tmpdir)
    return [os.path.join(directory, name) for name in files]
