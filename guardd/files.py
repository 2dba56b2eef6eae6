"""The operator's files (the daemon config, the policies, their domain lists): regular files
only, each bounded in bytes.

guardd reads them at start and at every reload, on its loop. A FIFO held the reload, and every
listener with it, until a writer came; `/dev/zero` took 4 GB in 10 s (attack pass,
2026-12-06). So a file is opened without waiting for a writer (`O_NONBLOCK`, which a regular
file ignores), and refused unless it is a regular file no larger than its cap: an `OSError`
whose `strerror` says why, which the callers report as they report any unreadable file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

#: The most a daemon config or a policy file may hold (a policy of 100,000 rules is about 8 MB).
MAX_FILE_BYTES = 16 * 1024 * 1024
#: The most a domain list may hold: about two million names.
MAX_LIST_BYTES = 64 * 1024 * 1024


def open_bounded(path: Path, limit: int) -> BinaryIO:
    """`path` open for reading, if it is a regular file of at most `limit` bytes now (its
    reader stops at `limit` too, should it grow: `read_bounded`, or with `too_large`)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise too_large(limit)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path` (`open_bounded`), however it grows meanwhile."""
    with open_bounded(path, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise too_large(limit)
    return data


def too_large(limit: int) -> OSError:
    """The error of a file past its cap of `limit` bytes."""
    shown = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"
    return OSError(errno.EFBIG, f"it is larger than {shown}")
