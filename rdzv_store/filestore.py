"""``FileStore``: processes of one host rendezvous through one file, in torch 2.13's format.

The file is torch's append-only record log (``filelog``), locked with a
whole-file ``flock`` on the data file itself, exactly as torch locks it, so a
torch ``FileStore`` (or ``init_method="file://..."``) and this one can use the
same file at the same time. See the class docstring for what is promised and
how this store differs from torch's.

Design, in short:

* Each instance keeps one descriptor, a byte offset and a cache (raw key ->
  value). Every operation takes the ``flock`` (``LOCK_EX`` for writes and
  read-modify-writes, ``LOCK_SH`` for reads), checks that the path still names
  the file it holds, parses only the records appended since its offset, works
  on the fresh cache and appends whole records with a single ``write`` while
  holding ``LOCK_EX``.
* A threading lock per instance serialises the threads that share it: an
  ``flock`` belongs to the open file description, so it cannot keep two
  threads of one instance apart.
* ``get``/``wait`` poll the file's ``stat`` (no lock) with a sleep that grows
  from 0.1 ms to a 2 ms cap, and take the lock only when the file changed (and
  at least every 50 ms regardless, for filesystems with cached attributes).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar, Union

from . import filelog
from .args import INT64_MAX, INT64_MIN, int64, parse_int64
from .errors import StoreError, format_keys, wait_timeout
from .filelock_impl import FCNTL, Locking
from .store import Store

__all__ = ["FileStore"]

_logger = logging.getLogger(__name__)

T = TypeVar("T")
PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: First and largest sleep between two looks at the file while ``get``/``wait`` block.
POLL_MIN_S = 0.0001
POLL_MAX_S = 0.002
#: A blocked ``get``/``wait`` takes the lock and re-reads at least this often even when
#: ``stat`` reports no change (attribute caches on network filesystems).
LOCKED_RECHECK_S = 0.05
#: Bytes read per ``pread`` when catching up (a larger record is read in one go).
_CHUNK = 1 << 20
#: How many times one operation follows the path to a new file before giving up. Each
#: follow means another instance compacted in the meantime (or, when opening, deleted the
#: file at its last close), so this is only a guard against livelock.
_MAX_FOLLOW = 10_000

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


class _FileGone(StoreError):
    """The path no longer names a file (it was deleted while the store was open)."""


def _counter(raw: bytes | None) -> int:
    """An internal counter's value; a missing, empty or garbled one counts as 0."""
    try:
        return parse_int64(raw or b"")
    except ValueError:
        return 0


def _os_error(path: str, op: str, exc: OSError) -> StoreError:
    name = errno.errorcode.get(exc.errno or 0, "")
    reason = exc.strerror or str(exc)
    return StoreError(f"FileStore {path}: {op} failed: {reason}" + (f" ({name})" if name else ""))


class _FileLog:
    """One instance's view of the file: descriptor, parse offset, cache, lifecycle.

    Public methods take ``mutex``; the ``_``-methods expect it to be held. The
    ``FileStore`` object is only a facade, so ``weakref.finalize`` can hold this
    object without keeping the store alive.
    """

    def __init__(
        self, path: str, abspath: str, world_size: int, locking: Locking, compact_threshold: int | None
    ) -> None:
        self.path = path
        self.abspath = abspath
        self.world_size = world_size
        self.locking = locking
        self.compact_threshold = compact_threshold
        self.mutex = threading.Lock()
        self.fd = -1
        self.ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file fd refers to
        self.pos = 0  # end of the last complete record parsed
        self.cache: dict[bytes, bytes] = {}
        self.torn: tuple[int, int] | None = None  # (size, mtime_ns) of a torn tail seen under LOCK_SH
        self.sig: tuple[int, int, int, int] | None = None  # (dev, ino, size, mtime_ns) at the last look
        self.base_size = 0  # file size after the last compaction or reopen (auto-compaction)
        self.owner_pid = os.getpid()
        self.closed = False
        # Set once the path stops naming our file other than by compaction: every later
        # operation fails with the same reason instead of silently using another file.
        self.lost: tuple[type[StoreError], str] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def join(self) -> None:
        """Open (creating the file if needed) and count this instance in ``refcount/``."""
        with self.mutex:
            for _ in range(_MAX_FOLLOW):
                fd = self._open_creating()
                try:
                    self._adopt(fd, os.fstat(fd), base_size=0)
                    self.locking.exclusive(fd)
                    try:
                        try:
                            now = os.stat(self.abspath)
                        except FileNotFoundError:
                            now = None  # deleted by a last close between our open and our lock
                        if now is not None and (now.st_dev, now.st_ino) == self.ident:
                            self._refresh(fd, now, exclusive=True)
                            count = int64(_counter(self.cache.get(filelog.REFCOUNT)) + 1)
                            self._append(fd, [(filelog.REFCOUNT, str(count).encode())])
                            return
                    finally:
                        self.locking.unlock(fd)
                except OSError as exc:
                    self._drop(fd)
                    raise _os_error(self.path, "open", exc) from exc
                except BaseException:
                    self._drop(fd)
                    raise
                self._drop(fd)  # the path names another file now: open it again
            raise StoreError(f"FileStore {self.path}: open failed: the file kept being replaced")

    def _open_creating(self) -> int:
        try:
            return os.open(self.abspath, _OPEN_FLAGS | os.O_CREAT, 0o644)
        except FileNotFoundError as exc:
            parent = os.path.dirname(self.abspath)
            if not os.path.isdir(parent):
                raise StoreError(f"FileStore {self.path}: directory {parent} does not exist") from exc
            raise _os_error(self.path, "open", exc) from exc
        except OSError as exc:
            raise _os_error(self.path, "open", exc) from exc

    def _drop(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass
        if self.fd == fd:
            self.fd = -1

    def release(self, raise_errors: bool) -> None:
        """torch's destructor: ``cleanup/`` += 1, ``refcount/`` -= 1, and delete the file when
        no instance is left and ``world_size`` instances have finished. Idempotent."""
        with self.mutex:
            if self.closed:
                return
            self.closed = True
            try:
                if os.getpid() != self.owner_pid:
                    return  # a forked child's copy: the parent owns this reference
                self._locked("close", True, self._leave)
            except StoreError:
                if self.lost is not None:
                    pass  # torch's rule: a file that is gone (or is not ours any more) is left alone
                elif raise_errors:
                    raise
                else:
                    _logger.warning("FileStore %s: cleanup at close failed", self.path, exc_info=True)
            finally:
                if self.fd >= 0:
                    try:
                        os.close(self.fd)
                    except OSError:
                        pass
                    self.fd = -1

    def _leave(self, fd: int) -> None:
        cleanup = int64(_counter(self.cache.get(filelog.CLEANUP)) + 1)
        refcount = int64(_counter(self.cache.get(filelog.REFCOUNT)) - 1)
        self._append(fd, [(filelog.CLEANUP, str(cleanup).encode()), (filelog.REFCOUNT, str(refcount).encode())])
        if refcount == 0 and self.world_size >= 0 and cleanup >= self.world_size:
            # Unlinked while we still hold the lock: anyone who locks the old file after us
            # finds the path gone (or a new file) and does not write into the unlinked one.
            try:
                os.unlink(self.abspath)
            except OSError:
                pass

    def after_fork_in_child(self) -> None:
        self.mutex = threading.Lock()
        if self.fd >= 0:
            try:
                os.close(self.fd)  # the child's copy: the parent's lock, if any, is unaffected
            except OSError:
                pass
            self.fd = -1  # reopened (a new open file description) by the next operation

    # -- the locked section ------------------------------------------------------------------
    def read(self, op: str, look: Callable[[dict[bytes, bytes]], T]) -> T:
        with self.mutex:
            return self._locked(op, False, lambda fd: look(self.cache))

    def update(self, op: str, decide: Callable[[dict[bytes, bytes]], tuple[list[tuple[bytes, bytes]], T]]) -> T:
        """Run ``decide(cache)`` under LOCK_EX on a fresh cache; append the records it returns."""

        def body(fd: int) -> T:
            records, result = decide(self.cache)
            if records:
                self._append(fd, records)
                self._maybe_compact(fd)
            return result

        with self.mutex:
            return self._locked(op, True, body)

    def compact(self) -> int:
        with self.mutex:
            return self._locked("compact", True, self._compact)

    def _locked(self, op: str, exclusive: bool, body: Callable[[int], T]) -> T:
        if self.closed and op != "close":
            raise StoreError(f"FileStore {self.path}: {op} on a closed store")
        try:
            fd, st = self._acquire(exclusive, op)
            try:
                self._refresh(fd, st, exclusive)
                return body(fd)
            finally:
                self.locking.unlock(fd)
                if fd != self.fd:  # replaced by compaction or the file was removed
                    os.close(fd)
        except OSError as exc:
            raise _os_error(self.path, op, exc) from exc

    def _acquire(self, exclusive: bool, op: str) -> tuple[int, os.stat_result]:
        """Lock our descriptor and return it with the path's ``stat``, following compactions."""
        if self.lost is not None:
            kind, why = self.lost
            raise kind(f"FileStore {self.path}: {op} failed: {why}")
        lock = self.locking.exclusive if exclusive else self.locking.shared
        for _ in range(_MAX_FOLLOW):
            if self.fd < 0:
                self._reopen(op)
            fd = self.fd
            lock(fd)
            try:
                try:
                    st = os.stat(self.abspath)
                except FileNotFoundError:
                    st = None
                if st is not None and (st.st_dev, st.st_ino) == self.ident:
                    return fd, st
                compacted = st is not None and self._saw_compaction(fd)
            except BaseException:
                self.locking.unlock(fd)
                raise
            self.locking.unlock(fd)
            self._drop(fd)
            if st is None:
                self.lost = (_FileGone, "the file was removed while the store was open")
            elif not compacted:
                self.lost = (
                    StoreError,
                    "the file was replaced by a different file while the store was open (deleted and created again?)",
                )
            if self.lost is not None:
                kind, why = self.lost
                raise kind(f"FileStore {self.path}: {op} failed: {why}")
            # Compacted by another instance: the next round opens the new file.
        raise StoreError(f"FileStore {self.path}: {op} failed: the file kept being replaced")

    def _reopen(self, op: str) -> None:
        try:
            fd = os.open(self.abspath, _OPEN_FLAGS)
        except FileNotFoundError:
            self.lost = (_FileGone, "the file was removed while the store was open")
            raise _FileGone(f"FileStore {self.path}: {op} failed: {self.lost[1]}") from None
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._adopt(fd, st, base_size=st.st_size)

    def _adopt(self, fd: int, st: os.stat_result, base_size: int) -> None:
        """Make ``fd`` our file and forget everything parsed from another descriptor.

        Always a fresh start, even for an equal (st_dev, st_ino): once the old file is gone,
        a new file may be given the same inode number.
        """
        self.fd = fd
        self.ident = (st.st_dev, st.st_ino)
        self.pos = 0
        self.cache = {}
        self.torn = None
        self.sig = None
        self.base_size = base_size

    def _saw_compaction(self, fd: int) -> bool:
        """Did a compactor mark this (old) file before renaming a new one over the path?"""
        size = os.fstat(fd).st_size
        mark = filelog.COMPACTED_RECORD
        if size >= len(mark) and os.pread(fd, len(mark), size - len(mark)) == mark:
            return True
        # Someone (a torch process holding an old descriptor) wrote after the mark: scan.
        start = min(self.pos, size)
        records, _ = filelog.decode(_pread_all(fd, size - start, start))
        return (filelog.tombstone(filelog.COMPACTED), b"") in records

    # -- reading the log ---------------------------------------------------------------------
    def _refresh(self, fd: int, st: os.stat_result, exclusive: bool) -> None:
        size = st.st_size
        if size < self.pos:
            # Shrunk below what we parsed: truncated by someone outside the protocol. The file
            # is the truth, so read it again from the start.
            _logger.warning("FileStore %s: the file shrank from %d to %d bytes; re-reading it", self.path, self.pos, size)
            self.pos = 0
            self.cache = {}
            self.torn = None
        if size != self.pos and (exclusive or self.torn != (size, st.st_mtime_ns)):
            self._read(fd, size)
            if self.pos < size:
                if exclusive:
                    # Nobody writes without LOCK_EX, and we hold it: this incomplete record was
                    # left by a writer that died mid-record. Cut it off before appending.
                    _logger.warning(
                        "FileStore %s: removing a torn record of %d bytes at offset %d (a writer died mid-write)",
                        self.path,
                        size - self.pos,
                        self.pos,
                    )
                    os.ftruncate(fd, self.pos)
                    self.torn = None
                    size = self.pos
                else:
                    self.torn = (size, st.st_mtime_ns)  # do not re-read it until the file changes
            else:
                self.torn = None
        self.sig = (st.st_dev, st.st_ino, size, st.st_mtime_ns)

    def _read(self, fd: int, size: int) -> None:
        """Parse the complete records between ``pos`` and ``size``; stop at an incomplete one."""
        cache = self.cache
        start = self.pos  # file offset of buf[0]
        read_to = start
        buf = b""
        while read_to < size:
            need = filelog.next_record_size(buf) if buf else None
            want = min(size - read_to, max(_CHUNK, (need or 0) - len(buf)))
            chunk = os.pread(fd, want, read_to)
            if not chunk:
                break
            read_to += len(chunk)
            buf = buf + chunk if buf else chunk
            records, used = filelog.decode(buf)
            if records:
                filelog.apply(cache, records)
            if used:
                buf = buf[used:]
                start += used
        self.pos = start

    # -- writing the log ---------------------------------------------------------------------
    def _append(self, fd: int, records: list[tuple[bytes, bytes]]) -> None:
        """Append whole records (one ``write``) at the end of the file; LOCK_EX held, cache fresh."""
        data = filelog.encode_many(records)
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write (e.g. a full disk): finish or fail
                written += os.write(fd, memoryview(data)[written:])
        except OSError:
            try:
                os.ftruncate(fd, self.pos)  # leave no partial record behind
            except OSError:
                pass
            raise
        filelog.apply(self.cache, records)
        self.pos += len(data)

    def _maybe_compact(self, fd: int) -> None:
        threshold = self.compact_threshold
        if threshold is None or self.pos < threshold or self.pos < 2 * self.base_size:
            return
        try:
            self._compact(fd)
        except OSError:
            self.base_size = self.pos  # do not retry on every write; the next doubling will
            _logger.warning("FileStore %s: automatic compaction failed", self.path, exc_info=True)

    def _compact(self, fd: int) -> int:
        """Rewrite the live state to a temporary file and rename it over the path.

        Runs under LOCK_EX on the current file with a fresh cache. The old file gets the
        compaction mark first, so instances that lock it later follow the path to the new file.
        """
        data = filelog.snapshot(self.cache)
        target = os.path.realpath(self.abspath)
        directory, name = os.path.split(target)
        tmp_fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.compact-", dir=directory)
        try:
            os.fchmod(tmp_fd, stat.S_IMODE(os.fstat(fd).st_mode))
            view = memoryview(data)
            written = 0
            while written < len(data):
                written += os.write(tmp_fd, view[written:])
            os.fsync(tmp_fd)
            fcntl.fcntl(tmp_fd, fcntl.F_SETFL, fcntl.fcntl(tmp_fd, fcntl.F_GETFL) | os.O_APPEND)
            self._append(fd, [(filelog.tombstone(filelog.COMPACTED), b"")])
            os.rename(tmp_path, target)
        except BaseException:
            os.close(tmp_fd)
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            raise
        st = os.fstat(tmp_fd)
        # Our cache is exactly the new file's content. The old descriptor stays locked until
        # _locked() unlocks and closes it.
        self.fd = tmp_fd
        self.ident = (st.st_dev, st.st_ino)
        self.pos = len(data)
        self.base_size = len(data)
        self.torn = None
        self.sig = None
        return len(data)

    # -- polling -----------------------------------------------------------------------------
    def changed(self) -> bool:
        """Cheap, lock-free hint: does the path look different from our last look?"""
        try:
            st = os.stat(self.abspath)
        except OSError:
            return True
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.sig


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 24), offset)
        if not chunk:
            break
        parts.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


_LOGS: weakref.WeakSet[_FileLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for log in list(_LOGS):
        log.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class FileStore(Store):
    """A store kept in one file, shared by the processes and threads of one host.

    ``FileStore(file_name, world_size=-1)``: the file is created if needed (mode
    0644 minus the umask) and may already hold keys from an earlier run, which
    stay visible. ``world_size`` is torch's deletion rule: when an instance
    closes and no instance is left open on the file, and at least ``world_size``
    instances have closed in total, the file is deleted (``-1``: never).

    The file format, the ``flock`` locking and the ``refcount/``/``cleanup/``
    lifecycle are torch 2.13's, so torch processes can share the file with this
    store in both directions. Every instance counts as one user: ``close()`` (or
    ``with``, or garbage collection, or interpreter exit) releases it once.

    Differences from torch's FileStore:

    * Timeouts are exact (torch waits ``floor(t) + 1`` seconds) and a timeout
      ``<= 0`` means "check once, do not wait" (torch: 0 waits forever). Timeouts
      raise ``StoreTimeoutError`` naming the missing keys. A blocked ``get``
      returns within about 2 ms of another process's write (adaptive polling of
      the file's ``stat``, capped at 2 ms; torch polls every 10 ms).
    * A missing directory fails at once with ``StoreError`` (torch retries for
      300 s); so does using a store whose file was deleted or replaced behind
      its back (torch silently recreates it).
    * ``delete_key`` returns whether the key existed (torch always returns True)
      and writes nothing when it did not.
    * ``list_keys`` returns user keys only; torch also returns its internal keys
      with their first letter cut off (``'efcount/'``, ``'leanup/'``).
      ``num_keys`` counts ``refcount/`` and ``cleanup/`` exactly as torch does.
    * ``append``, ``multi_set`` and ``multi_get`` each take the lock once:
      ``append`` is atomic, ``multi_set`` writes all its records in one
      ``write``, and ``multi_get`` returns one consistent snapshot. torch builds
      them from separate calls.
    * A record torn by a writer that died mid-write is never read as data: readers
      stop before it without spinning (torch spins at 100% CPU), and the next
      writer of this library cuts it off before appending.
    * ``compact()`` and the opt-in ``compact_threshold`` keep the file bounded
      (torch's grows forever) - see below for when that is unsafe.
    * ``path`` also accepts ``os.PathLike``; a relative path is resolved once,
      at construction. ``clone()`` keeps the current timeout (torch resets it
      to 300 s). Stores held in module globals are released at interpreter exit
      (torch never releases them, so their file is never deleted).

    Compaction rewrites the live keys to a temporary file in the same directory
    and renames it over the path, holding the exclusive lock on the old file.
    Every operation of every rdzv-store instance checks, after locking, that the
    path still names the file it holds and otherwise moves to the new file, so
    no write is lost and every instance survives compaction. **It is unsafe
    while torch processes use the file**: torch keeps byte offsets into the
    file and reopens it by name, so after a compaction it misparses the new
    file and may write into the old one. Only compact (and only set
    ``compact_threshold``) when every user of the file is an rdzv-store
    FileStore. With ``compact_threshold=N`` the instance compacts after one of
    its writes once the file is at least ``N`` bytes and at least twice its
    size after the previous compaction (so the cost is amortised).

    Threads may share an instance (its operations then run one at a time).
    After ``fork()`` a child may keep using an inherited instance (it reopens
    the file), but only the creating process's ``close`` counts as leaving;
    create a new FileStore or ``clone()`` in the child to be counted there.

    Raises:
        TypeError: ``file_name`` is not str, bytes or path-like; ``world_size``
            or ``compact_threshold`` is not an int.
        ValueError: ``world_size`` does not fit in 64 bits, or
            ``compact_threshold`` is not positive.
        StoreError: the file name is invalid, its directory does not exist, or
            the file cannot be opened or locked (the message names the path).
        Operations raise what ``Store`` documents; also ``StoreError`` when the
        file was deleted or replaced behind the store, or after ``close()``;
        ``ValueError`` from ``add`` on a value that is not an integer;
        ``NotImplementedError`` for queues (as torch).

    Compaction leaves a ``.NAME.compact-*`` temporary file behind only if the
    process dies in the middle of one; it can be deleted. The new file gets the
    old file's mode, but belongs to the user who compacted.

    Hazard shared with torch: a torch process that meets a torn record spins
    forever while holding its lock on the file, so every other user (ours
    included) blocks until that process is killed. Our writers cut a torn
    record off when they get to it first; if a torch writer appends after it
    first (torch's ``set`` does not read the file), the log is corrupt for
    every reader and, without checksums in the format, nobody can tell.

    Filesystems: promised on local filesystems with ``flock`` and an atomic
    ``rename`` (tested on ext4 and tmpfs). NFS is not tested. For a Linux
    client on NFSv3 with lockd or on NFSv4 this much is expected, as for
    torch's FileStore: ``flock`` becomes a whole-file lock granted by the
    server, so operations from several hosts exclude each other, and the
    client revalidates its cache of the file when it takes the lock; every
    read and write here happens under that lock, so values stay coherent. A
    blocked ``get``/``wait`` can miss a change in ``stat`` for the
    attribute-cache lifetime (3 s or more by default), so it also takes the
    lock and re-reads at least every 50 ms: expect wake-ups in tens of
    milliseconds, and lock round trips to the server on every operation. Not
    supported on NFS: compaction (other hosts' descriptors of the replaced file
    go stale, ``ESTALE``, instead of following it), so leave
    ``compact_threshold`` unset and do not call ``compact()``; mounts with
    ``nolock`` or ``local_lock=flock``/``all``, where locks are per host and
    concurrent writers corrupt the file; and any filesystem without ``flock``
    (some FUSE and SMB mounts).
    """

    #: How the flock is taken; a subclass may swap it (see ``filelock_impl`` and the benchmark).
    _locking: Locking = FCNTL

    def __init__(
        self,
        file_name: PathArg,
        world_size: int = -1,
        *,
        compact_threshold: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(file_name, (str, bytes, os.PathLike)):
            path = os.fsdecode(os.fspath(file_name))
        else:
            raise TypeError(f"file_name must be str, bytes or os.PathLike, not {type(file_name).__name__}")
        if isinstance(world_size, bool) or not isinstance(world_size, int):
            raise TypeError(f"world_size must be an int, not {type(world_size).__name__}")
        if not INT64_MIN <= world_size <= INT64_MAX:
            raise ValueError(f"world_size {world_size} does not fit in 64 bits")
        if compact_threshold is not None:
            if isinstance(compact_threshold, bool) or not isinstance(compact_threshold, int):
                raise TypeError("compact_threshold must be an int (bytes) or None")
            if compact_threshold <= 0:
                raise ValueError("compact_threshold must be a positive number of bytes")
        if not path or "\0" in path:
            raise StoreError(f"FileStore {path!r}: invalid file name")
        self._file_name = file_name
        self._world_size = world_size
        self._path = path
        self._where = f"FileStore {path}"
        self._log = _FileLog(path, os.path.abspath(path), world_size, self._locking, compact_threshold)
        self._log.join()
        _LOGS.add(self._log)
        self._finalizer = weakref.finalize(self, self._log.release, False)

    @property
    def path(self) -> str:
        """The file name as given (bytes and path-like objects as ``str``).

        Raises:
            Nothing.
        """
        return self._path

    @property
    def world_size(self) -> int:
        """torch's deletion rule: the file goes once this many instances have closed (-1: never).

        Raises:
            Nothing.
        """
        return self._world_size

    def __repr__(self) -> str:
        state = ", closed" if self._log.closed else ""
        return f"FileStore(path={self._path!r}, world_size={self._world_size}{state})"

    def clone(self) -> FileStore:
        """A new instance on the same file (one more ``refcount/``), with the current timeout.

        Raises:
            StoreError: the file is gone or cannot be opened and locked.
        """
        other = type(self)(self._file_name, self._world_size, compact_threshold=self._log.compact_threshold)
        other.set_timeout(self._timeout_s)
        return other

    def close(self) -> None:
        """Leave the file: ``cleanup/`` += 1, ``refcount/`` -= 1, maybe delete it. Idempotent.

        Raises:
            StoreError: the file could not be updated or deleted (the first close only).
        """
        if self._finalizer.detach() is not None:
            self._log.release(raise_errors=True)

    @property
    def closed(self) -> bool:
        """Whether ``close()`` (or garbage collection) released this instance.

        Raises:
            Nothing.
        """
        return self._log.closed

    def compact(self) -> int:
        """Rewrite the file to its live keys only; return its new size in bytes.

        Unsafe while torch processes use the file (see the class docstring).

        Raises:
            StoreError: the file is gone, or the new file cannot be written or renamed.
        """
        return self._log.compact()

    # -- writes ----------------------------------------------------------------------------------
    def _set(self, key: bytes, value: bytes) -> None:
        record = [(filelog.user_key(key), value)]
        self._log.update("set", lambda cache: (record, None))

    def _multi_set(self, keys: list[bytes], values: list[bytes]) -> None:
        records = [(filelog.user_key(k), v) for k, v in zip(keys, values)]
        if records:
            self._log.update("multi_set", lambda cache: (records, None))

    def _append(self, key: bytes, value: bytes) -> None:
        raw = filelog.user_key(key)
        self._log.update("append", lambda cache: ([(raw, cache.get(raw, b"") + value)], None))

    def _add(self, key: bytes, amount: int) -> int:
        raw = filelog.user_key(key)

        def decide(cache: dict[bytes, bytes]) -> tuple[list[tuple[bytes, bytes]], int]:
            old = cache.get(raw)
            try:
                current = parse_int64(old) if old else 0
            except ValueError as exc:
                raise ValueError(f"add on key {format_keys([key])}: stored value is {exc}") from None
            total = int64(current + amount)
            return [(raw, str(total).encode())], total

        return self._log.update("add", decide)

    def _compare_set(self, key: bytes, expected: bytes, desired: bytes) -> bytes:
        raw = filelog.user_key(key)

        def decide(cache: dict[bytes, bytes]) -> tuple[list[tuple[bytes, bytes]], bytes]:
            current = cache.get(raw)
            if current is None:
                if expected:
                    return [], expected  # torch's rule: nothing stored, "expected" returned
            elif current != expected:
                return [], current
            return [(raw, desired)], desired

        return self._log.update("compare_set", decide)

    def _delete_key(self, key: bytes) -> bool:
        raw = filelog.user_key(key)

        def decide(cache: dict[bytes, bytes]) -> tuple[list[tuple[bytes, bytes]], bool]:
            # Under LOCK_EX with a fresh cache, a key we do not have is absent for everyone,
            # so no tombstone is needed.
            if raw in cache:
                return [(filelog.tombstone(raw), b"")], True
            return [], False

        return self._log.update("delete_key", decide)

    # -- reads -----------------------------------------------------------------------------------
    def _check(self, keys: list[bytes]) -> bool:
        raws = [filelog.user_key(k) for k in keys]
        return self._log.read("check", lambda cache: all(r in cache for r in raws))

    def _num_keys(self) -> int:
        return self._log.read("num_keys", len)

    def _list_keys(self) -> list[bytes]:
        return self._log.read("list_keys", lambda cache: [k[1:] for k in cache if k[:1] == b"/"])

    # -- blocking reads --------------------------------------------------------------------------
    def _get(self, key: bytes, timeout: float) -> bytes:
        raw = filelog.user_key(key)
        value = self._log.read("get", lambda cache: cache.get(raw))
        if value is not None:
            return value
        return self._block("get", [key], timeout, looked=True)[0]

    def _multi_get(self, keys: list[bytes], timeout: float) -> list[bytes]:
        if not keys:
            return []
        return self._block("multi_get", keys, timeout)

    def _wait(self, keys: list[bytes], timeout: float) -> None:
        if keys:
            self._block("wait", keys, timeout)

    def _block(self, op: str, keys: list[bytes], timeout: float, looked: bool = False) -> list[bytes]:
        """Wait until every key exists; return their values, read under one lock.

        ``looked``: the caller has just looked once and found a key missing.
        """
        raws = [filelog.user_key(k) for k in keys]
        log = self._log

        def look(cache: dict[bytes, bytes]) -> list[bytes] | None:
            values = [cache.get(r) for r in raws]
            return None if None in values else values  # type: ignore[return-value]

        if not looked:
            values = log.read(op, look)
            if values is not None:
                return values
        start = time.monotonic()
        deadline = start + timeout
        last_locked = start
        delay = POLL_MIN_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(delay, remaining))
            now = time.monotonic()
            if log.changed() or now - last_locked >= LOCKED_RECHECK_S:
                last_locked = now
                values = log.read(op, look)
                if values is not None:
                    return values
                delay = POLL_MIN_S  # the file is busy: look again soon
            else:
                delay = min(delay * 2, POLL_MAX_S)

        # At the deadline look once more (a write that raced the timer counts), then fail.
        def final(cache: dict[bytes, bytes]) -> tuple[list[bytes] | None, list[bytes]]:
            return look(cache), [k for k, r in zip(keys, raws) if r not in cache]

        values, missing = log.read(op, final)
        if values is not None:
            return values
        raise wait_timeout(missing, timeout, self._where)
