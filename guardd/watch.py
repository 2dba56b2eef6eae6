"""`--watch`: reload when the policy file, or a domain list it names, changes.

Polled: a Kubernetes ConfigMap update swaps a symlink two levels up (`..data`), an editor renames
a new file over the old, a list may be rewritten in place; following each file's identity
through `stat` (which follows symlinks: device, inode, size, modification time) sees all of them
alike, at the cost of a few stat calls a second. A change is acted on once the files have stayed
the same for one poll, and no writer has one open: by a read lease where guardd may take one
(the file's owner, or CAP_LEASE: refused while any process has the file open for writing, by
any name), else as inotify on their directories saw it (IN_CREATE or IN_MODIFY, then
IN_CLOSE_WRITE: `_Writers`). A file half-written is no policy to load: cut
short, it is often valid YAML still, an allow rule without its `port:` or the `tests:` that
would have caught it (session 54's attack: a list rewritten in place by a writer that paused
for 3.5 s, its denied name last, was loaded without it, and that name served until the next
reload). What no watch can tell apart: two writers one after the other (`>` then `>>`) each
leave a whole file. So policy files are replaced, not rewritten (docs/deploy.md).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import signal
import struct
import threading
from collections.abc import Mapping, Sequence

log = logging.getLogger("guardd.watch")
_IN_MODIFY = 0x2
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
#: What a watch on a followed file's directory reports of the files in it.
_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
#: Polls a file may be held open by a writer that changed it before guardd says so: until it
#: is closed, no change of any followed file is loaded.
WRITER_PATIENCE = 10

Stamp = tuple[int, int, int, int, int] | None
#: The digest of a file whose loads read different contents: no content has it, so the file
#: is not as read, whatever it holds now.
READ_DIFFERENTLY = "read differently"
#: The stamp of a file whose state when it was read is not known: no file has it.
_UNKNOWN: Stamp = (-1, -1, -1, -1, -1)


def stamp(path: str) -> Stamp:
    """What identifies the file's content at `path` now (None: it cannot be read): its change
    time too, which no program sets back (session 55's attack: `cp -p` over a list in place,
    the same size and modification time, was never reloaded)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns


class _Writers:
    """Which of the followed files a writer has open (`busy`): any writer, by a read lease,
    where guardd may take one; else those inotify saw create or change a file in place and
    not close it yet (a watch on the directory of each file, where its symlinks lead, which
    sees a file that is not there yet come, and one deleted and written again). With neither
    (no inotify instance, no lease), polling alone decides, and the log says so."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)  # (the C library Python runs on)
        self._add = libc.inotify_add_watch
        self._remove = libc.inotify_rm_watch
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            log.warning("--watch: no inotify instance (%s): a policy file rewritten in place "
                        "may be read half-written", os.strerror(ctypes.get_errno()))
        self._directories: dict[int, bytes] = {}  # watch descriptor -> directory
        self._files: dict[tuple[bytes, bytes], str] = {}  # (directory, name) -> path followed
        #: The followed files a writer changed and has not closed, as inotify saw them.
        self.open: dict[str, None] = {}
        #: The files `busy` found open for writing, and for how many polls in a row.
        self._held: dict[str, int] = {}
        # A lease a writer breaks while guardd holds it (between taking and closing it) is
        # signalled, SIGIO by default, which would end the process: it is ignored (leases are
        # only taken from the main thread, where signals can be set).
        self._leases = threading.current_thread() is threading.main_thread()
        if self._leases:
            signal.signal(signal.SIGIO, signal.SIG_IGN)

    def follow(self, paths: Sequence[str]) -> None:
        """Watch the files at `paths` from now, where their symlinks lead now; what a writer
        still has open stays so (review of session 54: forgotten at a reload, a file half-
        written was loaded at the next poll)."""
        if self._fd < 0:
            return
        self.read()
        files = {os.path.split(os.fsencode(os.path.realpath(path))): path for path in paths}
        directories: dict[int, bytes] = {}
        for directory in dict.fromkeys(directory for directory, _ in files):
            watch = self._add(self._fd, directory, _MASK)
            if watch < 0:
                log.warning("--watch: cannot watch %s for writers (%s): a policy file in it "
                            "rewritten in place may be read half-written",
                            os.fsdecode(directory), os.strerror(ctypes.get_errno()))
            else:
                directories[watch] = directory
        for watch in set(self._directories) - set(directories):
            self._remove(self._fd, watch)
        before = {path: key for key, path in self._files.items()}
        now = {path: key for key, path in files.items()}
        self.open = {path: None for path in self.open
                     if path in now and before.get(path) == now[path]}  # (the same file)
        self._directories, self._files = directories, files

    def read(self) -> None:
        """Take the events since the last read: a file created or changed is open, until its
        writer closes it (or it is renamed over, or deleted)."""
        if self._fd < 0:
            return
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            for watch, mask, name in _events(data):
                if mask & _IN_Q_OVERFLOW:
                    log.warning("--watch: inotify dropped events; a writer may be missed")
                directory = self._directories.get(watch)
                path = self._files.get((directory, name)) if directory is not None else None
                if path is None:
                    continue
                if mask & (_IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_DELETE):
                    self.open.pop(path, None)  # (renamed away: its writer writes elsewhere)
                elif mask & (_IN_CREATE | _IN_MODIFY):
                    self.open[path] = None

    def busy(self, paths: Sequence[str]) -> list[str]:
        """The files at `paths` a writer has open now: by a read lease where guardd can take
        one (refused while any process has the file open for writing, by whatever name: a
        hard link elsewhere, a second writer, what inotify did not see: session 54's
        re-attack), else as inotify saw them; one held past `WRITER_PATIENCE` polls is named
        in the log."""
        self.read()
        found = []
        for path in paths:
            written = _written_now(path) if self._leases else None
            if written is False:
                self.open.pop(path, None)  # (no writer, whatever an event said)
            elif written or path in self.open:
                found.append(path)
        self._held = {path: self._held.get(path, 0) + 1 for path in found}
        for path, polls in self._held.items():
            if polls == WRITER_PATIENCE:
                log.warning("--watch: %s is open for writing after %d polls: no change is "
                            "loaded until its writer closes it (replace policy files rather "
                            "than rewrite them; SIGHUP loads them as they are)", path, polls)
        return found


def _written_now(path: str) -> bool | None:
    """Whether a process has the file at `path` open for writing: a read lease is refused
    while one does (EAGAIN), and given back at once; None when no lease can be taken (guardd
    neither the file's owner nor holding CAP_LEASE, a file system without leases, no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # (which gives a lease taken back)
    return False


def _events(data: bytes) -> list[tuple[int, int, bytes]]:
    """The inotify events in one read: each one's watch, mask and name (NUL-padded)."""
    events, at = [], 0
    while at + _EVENT.size <= len(data):
        watch, mask, _, size = _EVENT.unpack_from(data, at)
        at += _EVENT.size
        events.append((watch, mask, data[at:at + size].rstrip(b"\0")))
        at += size
    return events


class FileWatch:
    """The files a policy was read from, and whether they changed since it was loaded."""

    def __init__(self, paths: Sequence[str], digests: Mapping[str, str] | None = None,
                 seen: dict[str, Stamp] | None = None) -> None:
        self._writers = _Writers()
        #: The changed files a writer still had open at the last poll (none: settled, or no
        #: change).
        self.being_written: list[str] = []
        self.follow(paths, seen, digests)

    def now(self) -> dict[str, Stamp]:
        """The files' stamps now: taken before a load reads them, so an edit that lands while it
        reads is seen as a change afterwards."""
        return {path: stamp(path) for path in self.paths}

    def follow(self, paths: Sequence[str], seen: dict[str, Stamp] | None = None,
               digests: Mapping[str, str] | None = None) -> None:
        """Watch `paths` from here on, as they were when the policy was read (`seen`, from
        `now()` before the load; a file the new policy names first is stamped now), and the
        SHA-256 of the content read of each (`digests`, where known: `_metadata_alone`)."""
        known = seen or {}
        self._digests = dict(digests or {})
        self.paths = tuple(paths)
        self.loaded = tuple(known[path] if path in known else self._stamp_as_read(path)
                            for path in self.paths)
        self._last = self.loaded
        self._writers.follow(self.paths)

    def changed(self) -> bool:
        """True once the files differ from what was loaded, did not change since the last
        poll, and no writer still has one open (settled); the caller reloads, then `follow`s
        the files the new policy names."""
        now = self._stamps()
        settled = now == self._last
        self._last = now
        self.being_written = self._writers.busy(self.paths) if settled and \
            now != self.loaded else []
        if not settled or now == self.loaded or self.being_written:
            return False
        if all(self._metadata_alone(path, then, found)
               for path, then, found in zip(self.paths, self.loaded, now, strict=True)
               if then != found):
            self.loaded = now
            return False
        return True

    def _stamp_as_read(self, path: str) -> Stamp:
        """The stamp of the file at `path`, stamped after the load read it: its stamp now when
        its content is what the load read (its SHA-256, where known), else `_UNKNOWN`, a change
        (CI of session 56: a list edited between start-up's read and the watch's first look
        was taken for the state loaded, and never reloaded). Stamped first, so an edit while
        the content is read shows in one or the other."""
        found = stamp(path)
        if path not in self._digests or self._as_read(path):
            return found
        return _UNKNOWN

    def _metadata_alone(self, path: str, then: Stamp, found: Stamp) -> bool:
        """Whether only the change time of the file at `path` moved since it was loaded, its
        content the one read (session 55's re-attack: a `chmod`, a hard link or `touch -a`
        reloaded the policy, and a reload forgets the names clients resolved)."""
        if then is None or found is None or then[:4] != found[:4]:
            return False
        return self._as_read(path)

    def _as_read(self, path: str) -> bool:
        """Whether the file at `path` holds the content the load read (its SHA-256)."""
        digest = self._digests.get(path)
        if digest is None:
            return False
        try:
            with open(path, "rb") as file:
                return hashlib.file_digest(file, "sha256").hexdigest() == digest
        except OSError:
            return False

    def refused(self, seen: dict[str, Stamp] | None = None, named: Sequence[str] = ()) -> None:
        """The reload failed: the state it read (`seen`, else the last polled) is not tried
        again, only the next. The files the refused policies named (`named`) are followed too
        from now, as they are now: a domain list that was not there yet reloads when it comes
        (attack pass 24: it never did, and the new policy's deny never applied)."""
        loaded = tuple(seen[path] for path in self.paths) if seen else self._last
        added = tuple(path for path in dict.fromkeys(named) if path not in self.paths)
        self.paths += added
        # As read, they are not known (review: a list that came between the failed read and
        # now would be taken for the state refused): at most one reload more, refused again.
        self.loaded = loaded + (_UNKNOWN,) * len(added)
        self._last += tuple(stamp(path) for path in added)
        self._writers.follow(self.paths)

    def _stamps(self) -> tuple[Stamp, ...]:
        return tuple(stamp(path) for path in self.paths)
