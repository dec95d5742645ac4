"""Output paths, checked before any long work: every CLI that writes and every node that takes an
output path calls ``check_output_file`` / ``check_output_dir`` with its other input checks, so a
run never fails at the end on a folder it cannot write (``errors.OutputError``; CLIs exit 2)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputError
from .signals import defer_sigint

MIN_FREE_BYTES = 20 * 1024 ** 2  # a disk with less than this free is full for any output here


def _existing_ancestor(p: Path, flag: str) -> Path:
    """The deepest existing folder above ``p`` (what mkdir(parents=True) would create under);
    a regular file on the way is an error (``out.mp4/x.mp4``)."""
    a = p.parent
    while not a.exists():
        if a.parent == a:
            break
        a = a.parent
    if a.exists() and not a.is_dir():
        raise OutputError(f"{p}: cannot be created: {a} is a file, not a folder (given as {flag})")
    return a


def _probe(folder: Path, p: Path, flag: str, min_free: int) -> None:
    """Create and delete a hidden file in ``folder``: the only test that holds for root, ACLs and
    read-only mounts alike (os.access says yes to root on a chmod 555 folder, and root can write)."""
    with defer_sigint():  # Ctrl-C between create and delete would leave the test file behind
        try:
            fd, name = tempfile.mkstemp(prefix=".talkformer-write-test-", dir=folder)
        except OSError as e:
            raise OutputError(f"{p}: cannot write in {folder} ({e.strerror or e}; given as {flag}); "
                              "expected a writable folder") from None
        os.close(fd)
        os.unlink(name)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < min_free:
        raise OutputError(f"{p}: only {free / 1024 ** 2:.1f} MB free on the disk of {folder} (given as {flag}); "
                          f"expected at least {min_free / 1024 ** 2:.0f} MB")


def check_output_file(path: str | os.PathLike, flag: str = "--out", *, suffixes: tuple[str, ...] = (),
                      min_free: int = MIN_FREE_BYTES) -> Path:
    """``path`` can be written as a file: not an existing folder, no file where a parent folder
    must be, the folder that will hold it writable, some free space. ``suffixes``: allowed endings
    (lower case, with the dot). Returns the path; creates nothing."""
    p = Path(os.fspath(path)).expanduser()
    if str(path).strip() == "":
        raise OutputError(f"{flag}: an empty path; expected a file name")
    if p.is_dir():
        raise OutputError(f"{p}: is an existing folder (given as {flag}); expected a file name "
                          "(a path inside that folder)")
    if suffixes and p.suffix.lower() not in suffixes:
        raise OutputError(f"{p}: expected a file name ending in {' or '.join(suffixes)} (given as {flag})")
    folder = p.parent if p.parent.is_dir() else _existing_ancestor(p, flag)
    _probe(folder, p, flag, min_free)
    return p


def check_output_dir(path: str | os.PathLike, flag: str = "--out", *, min_free: int = MIN_FREE_BYTES) -> Path:
    """``path`` can be used as an output folder: an existing writable folder, or creatable (no file
    in its place or above it, the deepest existing folder above it writable). Creates nothing."""
    p = Path(os.fspath(path)).expanduser()
    if str(path).strip() == "":
        raise OutputError(f"{flag}: an empty path; expected a folder")
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: is a file (given as {flag}); expected a folder")
    folder = p if p.is_dir() else _existing_ancestor(p, flag)
    _probe(folder, p, flag, min_free)
    return p
