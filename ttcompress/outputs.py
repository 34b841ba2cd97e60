"""Where a command writes, checked before it does any work; every file written atomically.

One guard for every command (:func:`guard`): each path the command will write is compared with each path it reads
(resolved paths, both the name itself and what a symlink points to, and device/inode), outputs that exist and are
not regular files (or symlinks, which are replaced, never written through) are refused, the output folder must be
writable, and a lock beside each output keeps a second run from writing the same file at the same time.

Files are written by :func:`atomic_write`: into a short temporary name in the output's own folder (so every valid
output name fits NAME_MAX), flushed to disk, then renamed over the target — a reader sees the old file or the new
one, never half of one, and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ttcompress.errors import UserError

PathLike = str | os.PathLike
_TMP_PREFIX = ".ttc-"


def _location(path: Path) -> Path:
    """The path with its folder resolved but its last component kept: where a rename into ``path`` lands."""
    return path.expanduser().absolute().parent.resolve() / path.name


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class _Input:
    given: Path
    location: Path
    target: Path
    identity: tuple[int, int] | None

    @classmethod
    def of(cls, path: PathLike) -> _Input:
        p = Path(path).expanduser()
        return cls(p, _location(p), p.absolute().resolve(), _identity(p))

    def clashes_with(self, out: Path) -> bool:
        """Would writing (renaming onto) ``out`` replace this input, or the file it is, or a file inside it?"""
        mine = {self.location, self.target}
        if _location(out) in mine or out.absolute().resolve() in mine:
            return True  # the input itself, or a symlink to it (which a rename would not harm, but nobody means that)
        return self.identity is not None and _identity(out) == self.identity  # a hard link, another mount


def _check_output(out: Path, inputs: list[_Input], flag: str) -> None:
    for source in inputs:
        if source.clashes_with(out):
            raise UserError(f"refusing to write {flag} {out} over the input {source.given}; choose another path")
    if out.is_symlink():
        return  # replaced by the rename, never written through
    try:
        st = out.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot use {flag} {out}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{flag} {out} is a directory; give a file name inside it, e.g. {out / 'model.safetensors'}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"refusing to replace {flag} {out}: it exists and is not a regular file (a device, pipe or "
                        "socket)")


def _check_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"cannot write {flag}: {folder} exists and is not a directory") from None
    except OSError as exc:
        raise UserError(f"cannot create the folder {folder} for {flag}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"the folder {folder} for {flag} is not writable")


def _lock_path(out: Path) -> Path:
    digest = hashlib.sha256(out.name.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return _location(out).parent / f"{_TMP_PREFIX}{digest}.lock"


@dataclass
class Outputs:
    """What :func:`guard` holds for one command: its output folders and the locks on its output files."""

    folders: list[Path] = field(default_factory=list)
    _locks: list[tuple[Path, int]] = field(default_factory=list, repr=False)

    def release(self) -> None:
        import fcntl

        for path, fd in reversed(self._locks):
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._locks.clear()


def _take_lock(out: Path, outputs: Outputs, flag: str) -> None:
    import fcntl

    lock = _lock_path(out)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UserError(f"cannot lock {flag} {out}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"another ttcompress run is writing {out} right now; wait for it or choose another "
                                f"{flag}") from None
            raise UserError(f"cannot lock {flag} {out}: {exc.strerror}") from None
        # the holder before us may have unlinked the file between our open and our lock: lock the file that is there
        if _same_file(fd, lock):
            outputs._locks.append((lock, fd))
            return
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    st = os.fstat(fd)
    return _identity(path) == (st.st_dev, st.st_ino)


@contextlib.contextmanager
def guard(
    files: Iterable[tuple[str, PathLike | None]] = (),
    inputs: Iterable[PathLike | None] = (),
    folders: Iterable[tuple[str, PathLike | None, Iterable[str]]] = (),
    lock: bool = True,
) -> Iterator[Outputs]:
    """Check every output against every input before any work, and hold a lock on each output while inside.

    ``files``: ``(flag, path)`` for each file the command will write (``None`` = not asked for).  ``folders``:
    ``(flag, folder, names)`` for an output folder and the file names the command will write into it (each checked
    like a file); a folder name that exists must be a directory.  ``inputs``: every path the command reads.
    ``lock`` False: check only (a data-parallel rank that writes nothing).
    """
    ins = [_Input.of(p) for p in inputs if p is not None]
    outputs = Outputs()
    planned: list[tuple[str, Path]] = []
    for flag, path in files:
        if path is not None:
            planned.append((flag, Path(path).expanduser()))
    for flag, folder, names in folders:
        if folder is None:
            continue
        d = Path(folder).expanduser()
        for source in ins:
            if _location(d) in (source.location, source.target):
                raise UserError(f"refusing to write {flag} {d}: it is the input {source.given}; choose another folder")
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise UserError(f"{flag} {d} exists and is not a directory")
        outputs.folders.append(d)
        planned.extend((flag, d / name) for name in names)
    seen: dict[Path, str] = {}
    for flag, path in planned:
        loc = _location(path)
        if loc in seen:
            raise UserError(f"{flag} {path} is also the path of {seen[loc]}; give them different paths")
        seen[loc] = flag
        _check_output(path, ins, flag)
    try:
        if lock:
            for folder in outputs.folders:
                _check_folder(folder, "the output folder")
            for flag, path in planned:
                _check_folder(_location(path).parent, flag)
                _take_lock(path, outputs, flag)
        yield outputs
    finally:
        outputs.release()


def check_output_path(out: PathLike, *inputs: PathLike | None, flag: str = "-o") -> Path:
    """One output checked against ``inputs`` without a lock (library callers that write a single file); its folder is
    created.  Commands use :func:`guard`."""
    path = Path(out).expanduser()
    _check_output(path, [_Input.of(p) for p in inputs if p is not None], flag)
    _check_folder(_location(path).parent, flag)
    return path


def atomic_write(path: PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it into place.

    The temporary name is short whatever ``path``'s name is (NAME_MAX), lives in the target's own folder (so the
    rename is atomic) and is removed on any failure; a symlink at ``path`` is replaced, never written through.
    """
    target = Path(path).expanduser()
    folder = _location(target).parent
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what a plain open() would have given, not mkstemp's 0o600
        os.replace(tmp, folder / target.name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return target


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, and set straight back
    os.umask(mask)
    return mask


def write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
