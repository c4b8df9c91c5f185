"""Atomic writes: a temporary file beside the target, renamed into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping

from converters.errors import CheckpointError


@contextlib.contextmanager
def atomic_target(path: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary path; on a clean exit it replaces ``path``, on error it is removed."""
    if os.path.exists(path) and not overwrite:
        raise CheckpointError("output exists (use overwrite / --force to replace it)", file=path)
    if os.path.isdir(path):
        raise CheckpointError("output is a directory", file=path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lopt-tmp-", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_files_atomic(directory: str, files: Mapping[str, Callable[[str], None]],
                       overwrite: bool) -> list[str]:
    """Write a folder of files with ``writer(tmp_path)`` each; nothing is left on failure.

    A new folder is built under a temporary name and renamed into place. An existing folder
    (``overwrite=True``) gets each file written to a temporary name and renamed over the old.
    """
    final = [os.path.join(directory, name) for name in files]
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError("output exists and is not a directory", file=directory)
    if os.path.isdir(directory):
        clashes = [p for p in final if os.path.exists(p)]
        if clashes and not overwrite:
            raise CheckpointError("output exists (use overwrite / --force to replace it)",
                                  file=clashes[0])
        tmps: dict[str, str] = {}
        try:
            for name, writer in files.items():
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.lopt-tmp-", dir=directory)
                os.close(fd)
                tmps[name] = tmp
                writer(tmp)
            for name, tmp in tmps.items():
                os.replace(tmp, os.path.join(directory, name))
        finally:
            for tmp in tmps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        return final
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=".lopt-tmp-", dir=parent)
    try:
        for name, writer in files.items():
            writer(os.path.join(tmpdir, name))
        os.rename(tmpdir, directory)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return final
