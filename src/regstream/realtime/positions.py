"""Positions on a partitioned bus (Redis Cluster): one event key per partition, as one event id.

An update's own id (``<epoch>_<ms>-<n>``, ``messages.EventKey``) places it in its partition's
history. A stream that follows registrations of several partitions (every unfiltered stream; a
list page in cluster mode) resumes from where it was in *each* of them, so its SSE ids are
positions: ``c.`` then, per partition in order, ``<epoch>-<ms>-<n>`` in base 36 (empty for a
partition the position says nothing about), joined by ``.``. At K = 16 that is at most ~350
bytes, in the browser's ``Last-Event-ID`` header.

Order across partitions is the order this instance dispatched the updates in (each partition's
updates stay in their history's order, so a registration's updates stay in ``seq`` order);
positions compare per partition only.
"""

from __future__ import annotations

import string

from regstream.realtime.messages import EventKey

#: one entry per partition; None: nothing known (never published, or not followed)
Position = tuple[EventKey | None, ...]

PREFIX = "c."
_DIGITS = string.digits + string.ascii_lowercase
_MAX_COMPONENT = 40


def _b36(value: int) -> str:
    if value == 0:
        return "0"
    out = []
    while value:
        value, rest = divmod(value, 36)
        out.append(_DIGITS[rest])
    return "".join(reversed(out))


def component(key: EventKey | None) -> str:
    """One partition's part of an encoded position."""
    if key is None:
        return ""
    return f"{_b36(int(key.epoch))}-{_b36(key.ms)}-{_b36(key.n)}"


def encode(position: Position) -> str:
    return PREFIX + ".".join(component(key) for key in position)


def join(components: list[str]) -> str:
    """``encode`` from components already encoded (the hub keeps them per partition)."""
    return PREFIX + ".".join(components)


def is_position(value: str | None) -> bool:
    return value is not None and value.startswith(PREFIX)


def decode(value: str | None, count: int) -> Position | None:
    """Parse a position of ``count`` partitions; None if it is not one (another K, garbage)."""
    if not value or not value.startswith(PREFIX) or len(value) > count * (_MAX_COMPONENT + 1) + 2:
        return None
    parts = value[len(PREFIX):].split(".")
    if len(parts) != count:
        return None
    out: list[EventKey | None] = []
    for part in parts:
        if not part:
            out.append(None)
            continue
        fields = part.split("-")
        if len(fields) != 3 or not all(f and f.isalnum() and f.isascii() for f in fields):
            return None
        try:
            epoch, ms, n = (int(f, 36) for f in fields)
        except ValueError:
            return None
        out.append(EventKey(str(epoch), ms, n))
    return tuple(out)


def after(position: Position, key: EventKey, index: int) -> bool:
    """Whether ``key`` (of partition ``index``) is past what ``position`` covers there (same
    epoch only; another epoch's key is not comparable: False)."""
    mine = position[index]
    if mine is None:
        return True
    return mine.epoch == key.epoch and (key.ms, key.n) > (mine.ms, mine.n)
