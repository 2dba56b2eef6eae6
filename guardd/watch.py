"""`--watch`: reload when the policy file, or a domain list it names, changes.

Polled, not inotify: a Kubernetes ConfigMap update swaps a symlink two levels up (`..data`), an
editor renames a new file over the old, a list may be rewritten in place; following each file's
identity through `stat` (which follows symlinks: device, inode, size, modification time) sees
all of them alike, at the cost of a few stat calls a second. A change is acted on once the files
have stayed the same for one poll, so a file caught half-written is not loaded (and if it is, the
reload refuses it and the next change is tried).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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


class FileWatch:
    """The files a policy was read from, and whether they changed since it was loaded."""

    def __init__(self, paths: Sequence[str]) -> None:
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

    def changed(self) -> bool:
        """True once the files differ from what was loaded and did not change since the last
        poll (settled); the caller reloads, then `follow`s the files the new policy names."""
        now = self._stamps()
        settled = now == self._last
        self._last = now
        return settled and now != self.loaded

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

    def _stamps(self) -> tuple[Stamp, ...]:
        return tuple(stamp(path) for path in self.paths)
