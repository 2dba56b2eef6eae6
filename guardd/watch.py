"""`--watch`: reload when the policy file, or a domain list it names, changes.

Polled: a Kubernetes ConfigMap update swaps a symlink two levels up (`..data`), an editor renames
a new file over the old, a list may be rewritten in place; following each file's identity
through `stat` (which follows symlinks: device, inode, size, modification time) sees all of them
alike, at the cost of a few stat calls a second. A change is acted on once the files have stayed
the same for one poll, and no writer that changed one in place still has it open (inotify's
IN_MODIFY, then IN_CLOSE_WRITE: `_Writers`). A file half-written is no policy to load: cut
short, it is often valid YAML still, an allow rule without its `port:` or the `tests:` that
would have caught it (session 54's attack: a list rewritten in place by a writer that paused
for 3.5 s, its denied name last, was loaded without it, and that name served until the next
reload). What no watch can tell apart: two writers one after the other (`>` then `>>`) each
leave a whole file. So policy files are replaced, not rewritten (docs/deploy.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import Sequence

log = logging.getLogger("guardd.watch")
_IN_MODIFY = 0x2
_IN_CLOSE_WRITE = 0x8
_IN_IGNORED = 0x8000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

Stamp = tuple[int, int, int, int] | None
#: The stamp of a file whose state when it was read is not known: no file has it.
_UNKNOWN: Stamp = (-1, -1, -1, -1)


def stamp(path: str) -> Stamp:
    """What identifies the file's content at `path` now (None: it cannot be read)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


class _Writers:
    """Which of the followed files a writer changed in place and has not closed yet (inotify,
    a watch on each file's inode; none when the kernel gives no inotify instance: then
    polling alone decides)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._add = libc.inotify_add_watch
        self._remove = libc.inotify_rm_watch
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            log.warning("--watch: no inotify instance (%s): a policy file rewritten in place "
                        "may be read half-written", os.strerror(ctypes.get_errno()))
        self._paths: dict[int, str] = {}  # watch descriptor -> path
        #: The followed files a writer changed and has not closed.
        self.open: set[str] = set()

    def follow(self, paths: Sequence[str]) -> None:
        """Watch the files at `paths` now (their inodes: what a rename put there is watched
        from the next `follow`)."""
        if self._fd < 0:
            return
        for watch in self._paths:
            self._remove(self._fd, watch)
        self._paths = {}
        self.open.clear()
        for path in paths:
            watch = self._add(self._fd, os.fsencode(path), _IN_MODIFY | _IN_CLOSE_WRITE)
            if watch >= 0:  # (a file not there yet: its stamp says when it comes)
                self._paths[watch] = path
        self.read()

    def read(self) -> None:
        """Take the events since the last read: a change opens a file, its writer's close
        ends it."""
        if self._fd < 0:
            return
        while True:
            try:
                data = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            for watch, mask, _, size in _events(data):
                path = self._paths.get(watch)
                if path is None:
                    continue
                if mask & (_IN_CLOSE_WRITE | _IN_IGNORED):
                    self.open.discard(path)
                elif mask & _IN_MODIFY:
                    self.open.add(path)


def _events(data: bytes) -> list[tuple[int, int, int, int]]:
    """The inotify events in one read (each header, its name skipped)."""
    events, at = [], 0
    while at + _EVENT.size <= len(data):
        event = _EVENT.unpack_from(data, at)
        events.append(event)
        at += _EVENT.size + event[3]
    return events


class FileWatch:
    """The files a policy was read from, and whether they changed since it was loaded."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._writers = _Writers()
        self.follow(paths)

    def now(self) -> dict[str, Stamp]:
        """The files' stamps now: taken before a load reads them, so an edit that lands while it
        reads is seen as a change afterwards."""
        return {path: stamp(path) for path in self.paths}

    def follow(self, paths: Sequence[str], seen: dict[str, Stamp] | None = None) -> None:
        """Watch `paths` from here on, as they were when the policy was read (`seen`, from
        `now()` before the load; a file the new policy names first is stamped now)."""
        known = seen or {}
        self.paths = tuple(paths)
        self.loaded = tuple(known[path] if path in known else stamp(path)
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
        self._writers.read()
        return settled and now != self.loaded and not self.being_written

    @property
    def being_written(self) -> list[str]:
        """The files a writer changed in place and still has open (as of the last poll)."""
        return sorted(self._writers.open)

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
