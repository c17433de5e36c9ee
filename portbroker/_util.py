"""Small internal helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["collapse_single"]


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
