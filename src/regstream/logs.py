"""Logging set-up with a last line of defence against personal data.

Code logs ids, stages, codes and durations only (DOMAIN.md section 6). In case something slips
through (a library's message, an exception text), ``RedactingFilter`` masks, in every record:
E.164 phone numbers, ISO dates (dates of birth), e-mail addresses, runs of 7+ digits (national
ids, account numbers) and ``Authorization``/password values.
"""

from __future__ import annotations

import json
import logging
import re
import sys

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)(authorization|password|passwd|secret|token)(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}]+)"),
     r"\1\2***"),
    (re.compile(r"\+\d{3}(\d{2,12})(\d{2})\b"), r"+***…\2"),
    (re.compile(r"\b(19|20)\d{2}-\d{2}-\d{2}\b"), "****-**-**"),
    (re.compile(r"\b[\w.+-]+@([\w-]+\.)+[\w-]{2,}\b"), "***@***"),
    (re.compile(r"(?<![\w.-])\d{7,}(?![\w-])"), "*******"),
]  # fmt: skip


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            body["exc"] = record.exc_text
        return json.dumps(body)


def configure(level: str = "INFO", *, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter()
        if json_format
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
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
