"""Small internal helpers."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_json", "collapse_single"]


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


@contextlib.contextmanager
def collapse_single() -> Iterator[None]:
    """Re-raise a nursery's exception group as its one exception, if it holds one.

    trio wraps whatever escapes a nursery, the body's own exceptions included,
    in an ExceptionGroup. A context manager that opens a nursery for its own
    background tasks should not change the type of the exceptions its user
    raises or expects (``except MappingError``), so a group of exactly one
    leaf is unwrapped; real multi-failures stay grouped.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Write *data* as JSON to *path* atomically: temp file, fsync, rename, fsync the directory.

    A crash leaves the old file or the new one, never half of either.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, separators=(",", ":"))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory is synced.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
