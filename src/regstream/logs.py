"""Logging set-up with a last line of defence against personal data.

Code logs ids, stages, codes and durations only (DOMAIN.md section 6). In case something slips
through (a library's message, an exception text), ``RedactingFilter`` masks, in every record:
E.164 phone numbers, ISO dates (dates of birth), e-mail addresses, runs of 7+ digits (national
ids, account numbers) and ``Authorization``/password values.

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
        for name, value in record.__dict__.items():
            # fields given with ``extra=`` reach JSON lines as they are: masked like the message
            if name not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, name, redact(value))
        message = record.getMessage()
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


def configure(level: str = "INFO", *, json_format: bool = False) -> None:
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
