"""Logging set-up with a last line of defence against personal data.

Code logs ids, stages, codes and durations only (DOMAIN.md section 6). In case something slips
through (a library's message, an exception text), ``RedactingFilter`` masks, in every record:
E.164 phone numbers, ISO dates (dates of birth), e-mail addresses, runs of 7+ digits (national
ids, account numbers) and ``Authorization``/password values. It masks the formatted message
(the arguments as the text shows them) and every field given with ``extra=`` (JSON lines print
them), nested ones too (``redact_value``: dicts, lists, tuples, sets, bytes, exceptions, any
other object as its text; bounded in depth and size, so a cycle or a huge value costs little).

Access-log lines are not left to those masks: a query string is percent-encoded (``%2B2547…``,
``name%40example…``, ``02%2F04%2F1988``) and a search term can be a name, which no pattern
recognises. The request target of a ``uvicorn.access`` record keeps its path and the names of its
query parameters; only the values of a few known-harmless parameters are kept (``mask_query``).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from pythonjsonlogger.json import JsonFormatter as _LibraryJsonFormatter

# The five masks, applied one after another, in this order: a later mask sees the earlier ones'
# output (e.g. ``x@a.secret:abc`` -> ``x@a.secret:***`` -> ``***@***:***``), so they are not
# folded into one alternation, which would give a different result for such overlaps.
# fmt: off
_SECRET = re.compile(r"(?i)(authorization|password|passwd|secret|token)(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}]+)")
_PHONE = re.compile(r"\+\d{3}(\d{2,12})(\d{2})\b")
_DATE = re.compile(r"\b(19|20)\d{2}-\d{2}-\d{2}\b")
_EMAIL = re.compile(r"\b[\w.+-]+@([\w-]+\.)+[\w-]{2,}\b")
_DIGITS = re.compile(r"(?<![\w.-])\d{7,}(?![\w-])")
# fmt: on

# Cheap necessary conditions, each one weaker than the mask it guards (a text that fails it cannot
# match that mask, so skipping the mask changes nothing):
# - _SECRET needs one of its keywords (same sub-pattern and flags as _SECRET's first group; for
#   ASCII text ``str.lower`` plus ``in`` finds the same thing, several times faster);
# - _PHONE needs a "+", _EMAIL an "@";
# - _DATE and _DIGITS both need a digit that starts a word (nothing of [\w] before it) followed by
#   six more digits (_DIGITS) or by three digits and a "-" (_DATE). ``\d(?<!\w\d)`` is
#   ``(?<!\w)\d`` written so that the pattern starts with a character class, which lets the
#   regex engine skip quickly to the next digit.
_KEYWORD = re.compile(r"(?i:authorization|password|passwd|secret|token)")
_DATE_OR_DIGITS = re.compile(r"\d(?<!\w\d)(?:\d{6}|\d{3}-)")


def _has_keyword(text: str) -> bool:
    if text.isascii():
        lowered = text.lower()
        return (
            "authorization" in lowered
            or "passw" in lowered  # password, passwd
            or "secret" in lowered
            or "token" in lowered
        )
    return _KEYWORD.search(text) is not None


def redact(text: str) -> str:
    """Mask personal data and credentials in ``text`` (see the module docstring).

    Runs on every log line, most of which contain nothing to mask. Five ``re.sub`` passes cost
    20-30 µs on a typical T24 call line (~2.5 % of the service's CPU; the case-insensitive keyword
    pass alone ~8 µs). The checks below reject such a line in ~4 µs and skip the passes that
    cannot match; the passes themselves are unchanged, so the result is exactly that of the five
    passes in order.
    """
    has_keyword = _has_keyword(text)
    if (
        not has_keyword
        and "+" not in text
        and "@" not in text
        and _DATE_OR_DIGITS.search(text) is None
    ):
        return text
    if has_keyword:  # _SECRET runs first: ``text`` is still the input
        text = _SECRET.sub(r"\1\2***", text)
    if "+" in text:
        text = _PHONE.sub(r"+***…\2", text)
    text = _DATE.sub("****-**-**", text)
    if "@" in text:
        text = _EMAIL.sub("***@***", text)
    return _DIGITS.sub("*******", text)


#: ``redact_value``'s bounds: containers nested deeper, and items past the budget (all levels
#: together), are replaced by ``WITHHELD`` (never printed unmasked)
MAX_DEPTH = 6
MAX_ITEMS = 256
WITHHELD = "…"
_DIGITS_INT = 1_000_000  # an int of 7+ digits is masked as ``_DIGITS`` masks it in text


def redact_value(value: object) -> object:
    """``value`` with personal data masked, as ``redact`` masks text: a ``str`` masked; an ``int``
    or ``float`` of 7 or more integer digits ``*******``; other numbers, booleans and ``None`` as
    they are; dict keys and values, list, tuple and set items, recursively (a set becomes a
    list, bytes decoded text); an exception ``Type: text`` and any other object its ``str``, masked. Containers past
    ``MAX_DEPTH`` levels or ``MAX_ITEMS`` items in all become ``WITHHELD``."""
    # the common fields (text, small numbers) without a walk: this runs for every extra field
    if type(value) is str:
        return redact(value)
    if type(value) is int or type(value) is float:
        return value if -_DIGITS_INT < value < _DIGITS_INT else "*******"
    if type(value) is bool or value is None:
        return value
    return _Redaction().walk(value, 0)


class _Redaction:
    """One ``redact_value`` walk: counts the items seen against ``MAX_ITEMS``."""

    __slots__ = ("budget",)

    def __init__(self) -> None:
        self.budget = MAX_ITEMS

    def walk(self, value: object, depth: int) -> object:
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):  # a phone or an id parsed as a number, too
            return value if -_DIGITS_INT < value < _DIGITS_INT else "*******"
        if isinstance(value, bytes | bytearray | memoryview):
            return redact(bytes(value).decode("utf-8", "backslashreplace"))
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                return WITHHELD
            out: dict[object, object] = {}
            for key, item in value.items():
                if self.budget <= 0:
                    out[WITHHELD] = WITHHELD
                    break
                self.budget -= 1
                # a key is text (or a number) in a JSON line: masked like any other text
                plain = isinstance(key, str | int | float | bool) or key is None
                out[self.walk(key, depth) if plain else self._text(key)] = self.walk(
                    item, depth + 1
                )
            return out
        if isinstance(value, list | tuple | set | frozenset):
            if depth >= MAX_DEPTH:
                return WITHHELD
            items: list[object] = []
            for item in value:
                if self.budget <= 0:
                    items.append(WITHHELD)
                    break
                self.budget -= 1
                items.append(self.walk(item, depth + 1))
            return tuple(items) if isinstance(value, tuple) else items
        return self._text(value)

    @staticmethod
    def _text(value: object) -> str:
        """An exception as ``Type: text`` (python-json-logger's form), anything else as its
        ``str``, masked (a broken ``__str__`` does not break the log line)."""
        try:
            text = str(value)
        except Exception:  # noqa: BLE001
            text = WITHHELD
        if isinstance(value, BaseException):
            text = f"{type(value).__name__}: {text}"
        return redact(text)


# Query parameters whose values are logged: enumerations and small numbers, never personal data
# or credentials. Any other value (q, token, ticket, api_key, anything unknown) is logged as ***.
_KEPT_QUERY_VALUES = {
    "status": re.compile(r"[A-Z_]{1,16}"),
    "outcome": re.compile(r"[a-z]{1,16}"),
    "page": re.compile(r"[0-9]{1,6}"),
    "pageSize": re.compile(r"[0-9]{1,6}"),
    "registrationId": re.compile(r"[0-9]{1,16}"),
}
_QUERY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def mask_query(target: str) -> str:
    """``/path?q=%2B2547…&page=2`` → ``/path?q=***&page=2``: the path as it is, each query
    parameter's name (``***`` when it is not a plain identifier) and its value only when it is a
    known-harmless parameter with a value of the expected shape."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        shape = _KEPT_QUERY_VALUES.get(name)
        shown_name = name if _QUERY_NAME.fullmatch(name) else "***"
        shown_value = value if shape is not None and shape.fullmatch(value) else "***"
        parts.append(f"{shown_name}={shown_value}")
    return f"{path}?{'&'.join(parts)}"


#: a LogRecord's own attributes; any other attribute came from ``extra=``
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            # uvicorn's access line: (client, method, target, http version, status)
            record.args = tuple(
                mask_query(arg) if i == 2 and isinstance(arg, str) else arg
                for i, arg in enumerate(record.args)
            )
        fields = record.__dict__
        for name, value in fields.items():
            # fields given with ``extra=`` reach JSON lines as they are: masked like the message,
            # nested values too (replacing a key's value while iterating is allowed)
            if name in _RECORD_FIELDS or value is None or type(value) is float:
                continue
            if type(value) is str:
                fields[name] = redact(value)
            elif not (type(value) is int and -_DIGITS_INT < value < _DIGITS_INT):
                fields[name] = redact_value(value)
        if not isinstance(record.msg, str):
            # a dict msg: python-json-logger prints its fields; anything else: its text
            record.msg = redact_value(record.msg)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - wrong arguments: logging's error report would print them
            message = f"{record.msg} {redact_value(record.args)}"
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Keep the traceback, drop the exception's text (drivers quote parameters).
            exc = record.exc_info[1]
            record.exc_text = redact(
                "".join(logging.Formatter().formatException(record.exc_info).splitlines(True)[:-1])
                + f"{type(exc).__name__}: (message withheld)"
            )
            record.exc_info = None
        return True


class TextFormatter(logging.Formatter):
    """The stock text format, with the timestamp's ``strftime`` done once per second.

    ``formatTime`` (``localtime`` + ``strftime`` per record) was ~15 % of a log line's CPU, and
    the pipeline writes several lines per validation. The text is the stock one, byte for byte.
    """

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"  # the stock "%s,%03d"


class JsonFormatter(_LibraryJsonFormatter):
    """One JSON object per line (python-json-logger): ``ts`` (UTC, milliseconds), ``level``,
    ``logger``, ``message``, every field given with ``extra=`` (a T24 call's operation, HTTP
    status, correlation id …) and ``exc_info`` (the redacted traceback)."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}", style="{",
            rename_fields={"levelname": "level", "name": "logger"},
        )  # fmt: skip

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        log_data["ts"] = (
            datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        ).replace("+00:00", "Z")
        super().add_fields(log_data, record, message_dict)


def _own_logger(name: str) -> bool:
    return name == "regstream" or name.startswith("regstream.")


def configure(
    level: str = "INFO", *, json_format: bool = False, levels: tuple[tuple[str, str], ...] = ()
) -> None:
    """Root ``level`` and handler (text or JSON lines, ``RedactingFilter``); ``levels``: per
    logger (``config.parse_log_levels``), e.g. DEBUG for the T24 client's success lines only."""
    if not all(_own_logger(name) for name, _ in levels):
        raise ValueError("per-logger levels are for the service's own loggers only")
    # Our formats use none of the caller's file/line, thread or process: skip collecting them
    # for every record (the logging HOWTO's "Optimization" knobs; a T24 call's line cost ~20 %
    # less CPU without them, measured).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Libraries that log request URLs or SQL parameters at INFO/DEBUG (personal data): warnings only.
    for name in ("httpx", "httpcore", "aiosqlite", "asyncpg", "sqlalchemy.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, name_level in levels:
        logging.getLogger(name).setLevel(name_level)
