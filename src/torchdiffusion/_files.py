"""L0: files that are never half-written, folders that one trainer owns, and file-system errors as one line.

Every output of the library goes through :func:`atomic_write`: the bytes go to a hidden temp file in the same
folder (``.NAME.PID.TOKEN.tmp``), which is flushed, fsynced and renamed over ``NAME``; the folder is fsynced
after the rename. A crash, a kill -9, a full disk or Ctrl-C therefore leaves either the old file or the new
one, never a mix. Temp files left by a killed process carry its pid, so :func:`remove_stale_temps` can remove
exactly those whose writer is gone. :class:`FolderLock` is an advisory ``flock`` on ``FOLDER/.lock``; the
kernel releases it when its process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

try:  # POSIX; elsewhere the lock is an exclusive-create file (see FolderLock)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")

# The files a run folder owns (docs/design.md section 6): only the run layer writes them (``run_file=True``); a
# user-named output that names one of them inside a run folder is refused (:func:`refuse_run_file`).
RUN_FOLDER_FILES = ("config.json", "model.safetensors", "ema.safetensors", "train_state.safetensors", "log.csv",
                    ".lock", "tokenizer.json")
# a folder holding any of these is a run folder (``.lock`` exists from the trainer's first moment on)
RUN_FOLDER_MARKERS = ("model.safetensors", "ema.safetensors", "train_state.safetensors", ".lock")


class FileError(ValueError):
    """A one-line error about a file: what could not be done, the file, and the cause."""


def cause(e: BaseException) -> str:
    """The reason of an OS error in words (``No space left on device``), without the errno noise."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def is_run_folder(folder: str | Path) -> bool:
    """``folder`` is (or is becoming) a run folder: it holds weights, a training state or a trainer's lock."""
    folder = Path(folder)
    return any((folder / n).exists() for n in RUN_FOLDER_MARKERS)


def refuse_run_file(path: str | Path) -> Path:
    """The guard of every user-named output: refuse ``path`` if it names a file that belongs to a run folder
    (:data:`RUN_FOLDER_FILES`: its config, weights, EMA, training state, log or lock), whatever the command; such
    files are written only by the run layer. Relative parts (``RUN/sub/../config.json``) and symlinked folders
    are resolved first."""
    path = Path(path)
    if path.name in RUN_FOLDER_FILES:
        folder = Path(os.path.realpath(path.parent))
        if is_run_folder(folder):
            raise FileError(f"refusing to write {path}: it is the {path.name} of the run folder {folder}, which only "
                            "training writes; name another file")
    return path


def check_writable(path: str | Path) -> Path:
    """Refuse, before any work is done, an output ``path`` that cannot be written: a folder, a path under a
    file, a folder that cannot be created or is read-only. Creates the missing parent folders."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"cannot write {path}: it is a folder; give a file name")
    parent = path.parent
    up = parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if up.exists() and not up.is_dir():
        raise FileError(f"cannot write {path}: {up} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileError(f"cannot create folder {parent}: {cause(e)}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileError(f"cannot write {path}: folder {parent} is not writable (read-only file system or "
                        "no permission)")
    return path


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_path(path: Path) -> Path:
    """The hidden temp file that :func:`atomic_write` fills before renaming it to ``path``."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: str | Path, write: Callable[[Path], None], *, run_file: bool = False) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temp file in the same folder, which is fsynced and
    renamed over ``path``. On any failure (full disk, read-only file system, an interrupt) the old ``path`` is
    untouched, the temp file is removed, and an OS error becomes a one-line :class:`FileError`. Unless
    ``run_file`` (the run layer writing its own files), a path that names a run folder's file is refused
    (:func:`refuse_run_file`)."""
    if not run_file:
        refuse_run_file(path)
    path = check_writable(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise FileError(f"cannot write {path}: {cause(e)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def write_bytes(path: str | Path, data: bytes, *, run_file: bool = False) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), run_file=run_file)


def write_json(path: str | Path, obj, *, run_file: bool = False) -> Path:
    """:func:`atomic_write` of ``obj`` as indented JSON; non-finite numbers are refused (JSON has none)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    except ValueError:
        raise ValueError(f"refusing to write {path}: it would hold a NaN or infinite number") from None
    return write_bytes(path, (text + "\n").encode(), run_file=run_file)


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    """The bytes of ``path``; a missing or unreadable file is a one-line error naming it."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"cannot read {what} {path}: it is a folder")
    if not path.is_file():
        raise FileError(f"missing {what}: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise FileError(f"cannot read {what} {path}: {cause(e)}") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """``path`` as UTF-8 text; undecodable bytes are a one-line error naming the file."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(f"cannot read {what} {path}: not UTF-8 text (byte {e.start}); the file is damaged") from None


def read_json(path: str | Path, what: str = "file") -> dict:
    """A JSON object from ``path``; bad bytes, bad JSON or a non-object are one-line errors naming the file."""
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileError(f"corrupt JSON in {path}: {e}") from None
    if not isinstance(obj, dict):
        raise FileError(f"corrupt JSON in {path}: it holds a {type(obj).__name__}, not an object of sections")
    return obj


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files in ``folder`` that :func:`atomic_write` calls of processes no longer running
    (left by a kill -9 or a power cut); returns what was removed. A live writer's temp file is kept."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def prepare_output(path: str | Path) -> Path:
    """Check a user-named output path before the work (:func:`refuse_run_file`, :func:`check_writable`) and clear
    its folder of stale temp files."""
    path = check_writable(refuse_run_file(path))
    remove_stale_temps(path.parent)
    return path


class FolderLock:
    """An exclusive advisory lock on ``folder/.lock`` (``flock``; released by the kernel when the process dies).

    A second holder is refused with a one-line :class:`FileError` naming the holder's pid. ``release()`` (or
    leaving the ``with`` block) gives it back; the lock file itself stays, empty of meaning once unlocked, except
    in a folder that the lock created and nothing else was written to (a failed start leaves no trace).
    """

    def __init__(self, folder: str | Path, what: str = "trainer"):
        self.folder, self.what, self.fd, self.created = Path(folder), what, None, False

    def acquire(self) -> FolderLock:
        if self.fd is not None:
            return self
        path = self.folder / ".lock"
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FileError(f"cannot lock run folder {self.folder}: {cause(e)}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FileError(f"run folder {self.folder} is in use by another {self.what} ({holder}); wait for "
                                "it to finish, or use another --out") from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                if [p.name for p in self.folder.iterdir()] == [".lock"]:
                    (self.folder / ".lock").unlink()
                    self.folder.rmdir()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def package_version() -> str:
    """The installed package's version (``0.1.0+source`` when run from a source tree that is not installed); needs
    no torch, so that ``torchdiffusion --version`` answers at once."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchdiffusion")
    except PackageNotFoundError:
        return "0.1.0+source"
