"""Files mexify reads from users and writes for them: safe paths, checked outputs, atomic writes, locks.

Every path read from a file a user hands us (a bundle's ``config.yaml``, an export manifest) is
resolved through :func:`inside`: a name such as ``../../etc/passwd`` or an absolute path cannot
make a loader open a file outside the directory the user gave.

Every command that writes goes through the same few mechanisms, so nothing is lost and nothing is
left half-written:

* **Checked before any work.** :func:`check_writable` (a new output directory: not a file, not a
  non-empty directory of another kind, an existing one only when it may be replaced, in a writable
  place), :func:`check_updatable` (a bundle rewritten in place) and :func:`check_dir_writable` (a
  folder files are added to) raise one :class:`~mexify.errors.BundleError` up front, probing with
  a real file rather than trusting permission bits (root, ACLs, read-only mounts).
* **Atomic.** :func:`atomic_file` / :func:`write_text_atomic` write a file through a temporary file
  and a rename; :func:`replace_dir` builds a whole directory beside the old one and swaps it in.
  Temporary names carry the writer's pid, ``.NAME.tmp-<pid>-<random>``: the next write of ``NAME``
  removes those of processes that are gone (``kill -9``), never those of a live one.
* **One writer at a time.** :func:`bundle_lock` holds ``.NAME.lock`` beside ``NAME`` (``flock``,
  non-blocking): a second process writing the same bundle or output fails at once. The lock
  file is removed when released; one left by a killed process is taken over by the next run.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: writes are atomic but not locked
    fcntl = None  # type: ignore[assignment]

from mexify.errors import BundleError

__all__ = [
    "inside",
    "check_writable",
    "check_updatable",
    "check_dir_writable",
    "writing",
    "updating",
    "bundle_lock",
    "lock_path",
    "replace_dir",
    "atomic_file",
    "atomic_path",
    "write_text_atomic",
    "sweep_stale",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
MARKER = "config.yaml"  # the file that makes a directory a bundle (mexify.bundle.CONFIG_FILE)
_TMP = ".tmp-"


def inside(root: PathLike, name: object, what: str = "file") -> Path:
    """``root / name``, refused unless it resolves inside ``root`` (symlinks followed).

    Args:
        root: the directory the user gave (a bundle, an export).
        name: a relative path read from a file in ``root``.
        what: what the path is, for the message (``"graph"``, ``"weights"``).

    Raises:
        BundleError: ``name`` is not a non-empty relative path string, or leaves ``root``.
    """
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise BundleError(f"{root}: the {what} entry {name!r} is not a file name", "the file was altered; get a fresh copy")
    candidate = Path(name)
    base = root.resolve()
    resolved = (base / candidate).resolve()
    if candidate.is_absolute() or (resolved != base and base not in resolved.parents):
        raise BundleError(
            f"{root}: the {what} entry {name!r} points outside the directory; refusing to read it",
            "a bundle or export only names files inside itself; the file was altered, get a fresh copy",
        )
    return resolved


# =============================================================================== checks before work
def _probe(directory: Path, name: str) -> Optional[str]:
    """None if a file can be created in ``directory`` (an actual write, not the permission bits), else why not."""
    probe = directory / _tmp_name(name, "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: PathLike, overwrite: bool = False, *, marker: str = MARKER, what: str = "bundle",
                   flag: str = "--overwrite") -> None:
    """Before any work: may a new directory be written at ``out``?

    Refused: a file; a non-empty directory without ``marker`` (it is not a ``what``: never
    replaced); an existing ``what`` unless ``overwrite``; a place where nothing can be created.

    Raises:
        BundleError: the reason, with a hint.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise BundleError(f"{out} exists and is not a directory", "choose another output path with -o")
        if any(out.iterdir()):
            if not (out / marker).is_file():
                raise BundleError(f"{out} is a non-empty directory that is not a {what}; refusing to replace it",
                                  "choose a new or empty directory with -o")
            if not overwrite:
                raise BundleError(f"{out} already exists and is not empty", f"pass {flag} to replace it, or choose another -o")
    parent = _existing_ancestor(Path(os.path.abspath(out)).parent)
    if not parent.is_dir():
        raise BundleError(f"cannot create {out}: {parent} is not a directory", "choose another output path with -o")
    why = _probe(parent, Path(os.path.abspath(out)).name)
    if why:
        raise BundleError(f"cannot write {out}: {parent} is not writable ({why})", "choose a writable place with -o")


def check_updatable(path: PathLike, what: str = "update it") -> None:
    """Before any work: can the bundle ``path`` be rewritten in place (itself and its directory writable)?

    A missing ``path`` passes: the loader says what is missing.

    Raises:
        BundleError: the bundle or its directory is read-only.
    """
    path = Path(path)
    if not path.is_dir():
        return
    why = _probe(path, Path(os.path.abspath(path)).name)
    if why:
        raise BundleError(f"{path} is read-only: cannot {what} ({why})",
                          f"make it writable (chmod -R u+w {path}) or work on a copy")
    parent = Path(os.path.abspath(path)).parent
    why = _probe(parent, Path(os.path.abspath(path)).name)
    if why:
        raise BundleError(f"cannot {what}: {path} is in a read-only directory, {parent} ({why})",
                          "a bundle is rewritten beside itself; copy it somewhere writable")


def check_dir_writable(directory: PathLike, option: str = "--out") -> None:
    """Before any work: can files be added to ``directory`` (created if missing)?

    Raises:
        BundleError: it is a file, or nothing can be created there.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise BundleError(f"{directory} exists and is not a directory", f"choose another {option}")
    base = _existing_ancestor(directory)
    why = _probe(base, directory.name) if base.is_dir() else "not a directory"
    if why:
        raise BundleError(f"cannot write into {directory}: {base} is not writable ({why})", f"choose a writable {option}")


@contextlib.contextmanager
def writing(out: PathLike, overwrite: bool = False, *, marker: str = MARKER, what: str = "bundle",
            flag: str = "--overwrite") -> Iterator[Path]:
    """Claim a new output directory for a whole command: :func:`check_writable`, then :func:`bundle_lock`.

    Parent directories are created first (the lock file lives there); those created here are
    removed again if the command leaves them empty (it failed).
    """
    given, out = Path(out), Path(os.path.abspath(out))
    check_writable(given, overwrite, marker=marker, what=what, flag=flag)
    made: List[Path] = []
    parent = out.parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with bundle_lock(given):
            check_writable(given, overwrite, marker=marker, what=what, flag=flag)  # again, now that it is ours
            yield out
    finally:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def updating(path: Optional[PathLike], what: str = "update it") -> Iterator[None]:
    """Hold a bundle for a whole command that rewrites it: :func:`check_updatable`, then :func:`bundle_lock`.
    ``path`` None (a model object, or nothing to write): nothing is checked or held."""
    if path is None:
        yield
        return
    check_updatable(path, what)
    if not Path(path).is_dir():
        yield  # the loader reports it
        return
    with bundle_lock(path):
        yield


# =============================================================================== the lock
_HELD: Dict[str, list] = {}  # lock file -> [pid, thread id, depth]: the locks this process holds
_HELD_GUARD = threading.Lock()


def lock_path(path: PathLike) -> Path:
    """The lock file of bundle (or output) ``path``: ``.NAME.lock`` in its directory."""
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock"


def _locked(path: Path, lock: Path, fd: int) -> BundleError:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode(errors="replace").strip()
    except OSError:
        pid = ""
    who = f" (pid {pid})" if pid.isdigit() else ""
    return BundleError(f"{path} is locked: another mexify process{who} is updating it (lock file {lock})",
                       "wait for it to finish; two runs cannot write the same bundle at once")


def _acquire(path: Path, lock: Path) -> int:
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            fd = os.open(lock, os.O_RDONLY)  # another user's lock file: flock works on a read-only descriptor
        except OSError as e:
            raise BundleError(f"cannot create the lock file {lock}: {e.strerror}", "write somewhere writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            err = _locked(path, lock, fd)
            os.close(fd)
            raise err from None
        if _same_file(fd, lock):  # not a file its last holder removed while we waited to open it
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def bundle_lock(path: PathLike) -> Iterator[Path]:
    """Hold ``path``'s lock (``.NAME.lock`` beside it, ``flock``, non-blocking) for the ``with`` block.

    Re-entrant within a thread (a command holding the lock may call :func:`replace_dir`, which
    takes it too). The lock file is removed on release; a killed holder's lock is released by the
    kernel, and its file taken over by the next run.

    Raises:
        BundleError: another process (or thread) holds it: one line naming the bundle.
    """
    path, lock = Path(path), lock_path(path)
    key, pid, thread = str(lock), os.getpid(), threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[0] != pid:
            held = None  # inherited through fork: not ours
        if held is not None and held[1] != thread:
            raise BundleError(f"{path} is locked: another thread of this process is updating it (lock file {lock})",
                              "update a bundle from one thread at a time")
        if held is not None:
            held[2] += 1
    if held is not None:
        try:
            yield lock
        finally:
            with _HELD_GUARD:
                held[2] -= 1
        return
    if fcntl is None:  # pragma: no cover
        yield lock
        return
    fd = _acquire(path, lock)
    with _HELD_GUARD:
        _HELD[key] = [pid, thread, 1]
    try:
        yield lock
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        if _same_file(fd, lock):
            with contextlib.suppress(OSError):
                os.unlink(lock)  # while still holding it: a waiting opener re-checks the inode
        os.close(fd)


# =============================================================================== temporary names, sweep
def _tmp_name(name: str, tag: Optional[str] = None) -> str:
    return f".{name}{_TMP}{os.getpid()}-{tag or secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    try:  # a killed child its parent has not reaped yet is a zombie: gone for our purposes
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _rmtree(path: Path) -> None:
    """Remove a file or tree, making read-only directories writable on the way (a copied read-only bundle)."""
    def retry(func: Callable, p: str, *_: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, **({"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def sweep_stale(directory: PathLike, name: str) -> List[Path]:
    """Remove ``directory``'s temporaries of ``name`` (``.NAME.tmp-<pid>-...``) whose process is gone.

    A live process's temporaries are never touched. An old directory set aside by an interrupted
    two-rename swap (``...-old``) is put back when ``name`` itself is missing.
    Returns what was removed.
    """
    directory, prefix = Path(directory), f".{name}{_TMP}"
    removed: List[Path] = []
    try:
        entries = [e for e in os.listdir(directory) if e.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        pid, sep, tag = entry[len(prefix):].partition("-")
        if not (sep and pid.isdigit()) or _pid_alive(int(pid)):
            continue
        path = directory / entry
        if tag == "old" and not (directory / name).exists():
            try:
                os.rename(path, directory / name)
                log.warning("%s: put back the previous version left by an interrupted write", directory / name)
            except OSError:
                pass  # left as it is: the only copy
            continue
        _rmtree(path)
        removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes of %s", len(removed), directory / name)
    return removed


# =============================================================================== atomic writes
@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name (``.NAME.tmp-<pid>-<random>``);
    it replaces ``path`` when the block ends without an error, and is removed otherwise."""
    path = Path(path)
    sweep_stale(path.parent, path.name)
    tmp = path.parent / _tmp_name(path.name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w", fsync: bool = False, **kw: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; it replaces ``path`` when the block ends
    without an error, and is removed otherwise (``path`` keeps its old content)."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as with open()
        with os.fdopen(fd, mode, **kw) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path, "w") as fh:
        fh.write(text)


def replace_dir(out: PathLike, fill: Callable[[Path], Any], keep_from: Optional[PathLike] = None) -> None:
    """Build a new directory with ``fill(tmp)`` and swap it in for ``out``, holding ``out``'s lock.

    ``tmp`` is ``.NAME.tmp-<pid>-<random>`` beside ``out``; stale ones of dead processes are
    removed first. ``keep_from``: copy this directory's files (e.g. ``calibration/``) into the
    new one first, but no temporaries left in it. The swap is one ``renameat2(RENAME_EXCHANGE)``
    where the platform has it; elsewhere two renames, and a failure between them puts the old
    directory back.
    """
    out = Path(os.path.abspath(out))
    with bundle_lock(out):
        sweep_stale(out.parent, out.name)
        tmp = out.parent / _tmp_name(out.name)
        os.mkdir(tmp, 0o777)  # the umask applies, as with mkdir
        try:
            if keep_from is not None:
                shutil.copytree(keep_from, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(f".*{_TMP}*"))
                os.chmod(tmp, stat.S_IMODE(os.stat(tmp).st_mode) | stat.S_IRWXU)  # copystat took the old mode
            fill(tmp)
            _swap(tmp, out)
        except BaseException:
            _rmtree(tmp)
            raise


def _swap(tmp: Path, out: Path) -> None:
    """Put the finished directory ``tmp`` at ``out``; the old ``out``, if any, is removed."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):
        _rmtree(tmp)  # tmp now holds the old directory
        return
    old = out.parent / _tmp_name(out.name, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False if unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0
