"""Writing outputs so that users' files are never half-written, mixed or clobbered.

Every output is built in a temporary sibling of its final path and renamed into place only once
it is complete: a crash or Ctrl-C leaves either the old output or the new one, never a mixture.
A rename within one directory is atomic on POSIX file systems, which is why the temporary lives
beside the target rather than in /tmp (possibly another file system).

The checks (`check_output_file`, `check_output_dir`) need no model, so commands run them before
any slow work; the writers run the same checks again, for library callers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from adaroute.errors import AdarouteError

ROUTED_MARKER = "config.json"  # a routed directory's config.json holds an "adaroute" block


def check_output_file(path: str | Path, flag: str = "--json") -> Path:
    """A file path we can write (atomically): not a directory, in a writable (or creatable) folder."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise AdarouteError(f"{flag} {path} is a directory: give a file name such as {out / 'result.json'}")
    if out.exists() and not out.is_file():
        raise AdarouteError(f"{flag} {path} is not a regular file (a device or pipe?): give a file name")
    _check_creatable(out.parent, f"{flag} {path}")
    return out


def check_output_dir(path: str | Path, inputs: Iterable[Path] = (), force: bool = False,
                     protected: Iterable[Path] = (), flag: str = "-o") -> Path:
    """A directory we may (re)place whole.

    inputs:    files or directories read by the command: the output may not be one of them, lie
               inside one, or contain one (replacing it would delete the input).
    protected: directories the output may not be written inside (a source model directory).
    force:     allow replacing an existing non-empty routed model directory.
    """
    out = Path(path).expanduser().absolute()
    for item in inputs:
        src = Path(item).expanduser().absolute()
        if out == src or _inside(out, src) or _inside(src, out):
            raise AdarouteError(f"{flag} {path} would overwrite the input {item}: choose an output directory "
                                "outside the model and data it reads")
    for item in protected:
        if _inside(out, Path(item).expanduser().absolute()):
            raise AdarouteError(f"{flag} {path} is inside the source model directory {item}: choose an output "
                                "directory outside it")
    if out.exists() and not out.is_dir():
        raise AdarouteError(f"{flag} {path} exists and is not a directory: choose a new directory name")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise AdarouteError(f"{flag} {path} exists and is not empty: choose a new directory, or add --force "
                                "to replace it whole")
        if not is_routed_dir(out):
            raise AdarouteError(f"{flag} {path} holds files that are not a routed model: --force replaces only a "
                                "directory written by adaroute convert; choose another directory")
    _check_creatable(out.parent, f"{flag} {path}")
    return out


def is_routed_dir(path: Path) -> bool:
    try:
        return "adaroute" in json.loads((path / ROUTED_MARKER).read_text())
    except (OSError, ValueError, TypeError):
        return False


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and a rename."""
    out = check_output_file(path, flag="output")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def write_json_atomic(path: str | Path, payload) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it becomes ``path``.

    With ``replace`` an existing ``path`` is swapped out whole (never mixed with the new files) and
    deleted after the new one is in place; without it an existing non-empty ``path`` is an error.
    On any failure, Ctrl-C included, the temporary directory is removed and ``path`` is untouched.
    """
    out = Path(path).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        _swap_in(tmp, out, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path, replace: bool) -> None:
    if out.is_dir() and any(out.iterdir()):
        if not replace:
            raise AdarouteError(f"{out} appeared while writing and is not empty: nothing was replaced")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()  # empty: rename cannot replace a directory that exists
    os.replace(tmp, out)


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _check_creatable(folder: Path, what: str) -> None:
    """The nearest existing ancestor of ``folder`` is a writable directory."""
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise AdarouteError(f"{what}: {probe} is a file, so the folder cannot be created; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise AdarouteError(f"{what}: cannot write in {probe} (permission denied); choose a writable location")
