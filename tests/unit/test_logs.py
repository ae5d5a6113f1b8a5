"""Log redaction (regstream.logs): the fast ``redact`` gives exactly the five-pass result."""

from __future__ import annotations

import logging
import random
import re
import string

import pytest

from regstream.config import parse_log_levels as parse_levels
from regstream.logs import RedactingFilter, TextFormatter, _has_keyword, configure, redact

# The implementation before the fast path, kept verbatim as the oracle: five substitutions in order.
_REFERENCE_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)(authorization|password|passwd|secret|token)(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}]+)"),
     r"\1\2***"),
    (re.compile(r"\+\d{3}(\d{2,12})(\d{2})\b"), r"+***…\2"),
    (re.compile(r"\b(19|20)\d{2}-\d{2}-\d{2}\b"), "****-**-**"),
    (re.compile(r"\b[\w.+-]+@([\w-]+\.)+[\w-]{2,}\b"), "***@***"),
    (re.compile(r"(?<![\w.-])\d{7,}(?![\w-])"), "*******"),
]  # fmt: skip


def _reference_redact(text: str) -> str:
    for pattern, replacement in _REFERENCE_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_T24 = (
    "t24 get_customer page=- attempt=1 status=200 t24_code=- outcome=ok duration_ms=1.2 "
    "correlation_id={cid} customer=****31"
)

TRICKY = [
    "",
    " ",
    "plain text, nothing to mask",
    _T24.format(cid="3f2a9c1e0b7d4e5fa1c2d3e4f5a6b7c8"),
    _T24.format(cid="1234567e0b7d4e5fa1c2d3e4f5a6b7c8"),  # starts with 7 digits, then hex
    _T24.format(cid="12345678901234567890123456789012"),  # an all-digit id
    _T24.format(cid="1990a9c1e0b7d4e5fa1c2d3e4f5a6b7c"),
    _T24.format(cid="2024-01-02e0b7d4e5fa1c2d3e4f5a6b7"),
    "t24 get_customer page=2 attempt=3 status=503 t24_code=MAINT outcome=retry duration_ms=1500.0",
    # phones
    "+254712345678",
    "call +254712345678 now",
    "+254712345678901234",
    "+2547123456789012345678",
    "+25471234",
    "+2547123",
    "++254712345678",
    "12345678+254712345678",
    "+254712345678a",
    "+254712345678-1",
    "+254712345678.5",
    "+254 712 345 678",
    "tel:+254712345678,",
    # dates
    "1990-01-02",
    "born 1990-01-02.",
    "2024-12-31T10:00:00",
    "1890-01-02 2190-01-02 19901-01-02",
    "x1990-01-02",
    "1990-01-02x",
    "1990-01-021",
    "11990-01-02",
    "1990-01-02-03",
    "+2541990-01-02",
    "+25419901-01-02",
    "dob=1990-01-02",
    # e-mails
    "a.b@c.io",
    "mail jane.doe+kyc@example.co.ke please",
    "a@b.c",
    "a@b.cd",
    "@example.com",
    "x@y",
    "a.b@c.io@d.io",
    "1234567@c.io",
    "user@12345678.io",
    "x@a.secret:abc",
    "x@a.token=abc.io",
    "a@b.io.",
    "-a@b-c.io-",
    # long digit runs
    "1234567",
    "123456",
    "id 12345678901234567890 end",
    "1234567.89",
    "3.1234567",
    "v-1234567",
    "1234567-",
    "_1234567",
    "1234567_",
    "(1234567)",
    "[1234567],",
    "0712345678",
    # keyword=value forms
    "token=1234567",
    "token=abc",
    "TOKEN = abc",
    "Authorization: Bearer abc.def",
    "authorization:'Bearer abc'",
    'password: "hunter2"',
    'password:"hunter2", user=x',
    "passwd='s3cret'",
    "{'secret': 'x', 'token': \"y\"}",
    '{"password": "p@ss.word.io", "n": 1234567}',
    "secret=",
    "secret= ",
    "token=}",
    "tokens=1",
    "mytoken=+254712345678",
    "password=1990-01-02",
    "secret:a@b.io",
    "token=x token=y",
    "client_secret=abc&token=def",
    # unicode
    "ſecret=abc",
    "ſECRET=abc",
    "authorİzation: x",
    "AUTHORİZATİON=x",
    "toKen=x",
    "٣٤٥٦٧٨٩٠",
    "+٢٥٤٧١٢٣٤٥٦٧٨",
    "١٩٩٠-٠١-٠٢",
    "é1234567",
    "1234567é",
    "café jane@exämple.com",
    "naïve password=é",
    "…+254712345678…",
    "\u00a01234567\u00a0",
    "line one\nline two 1234567\n",
    "tab\t1990-01-02\t",
]


@pytest.mark.parametrize("text", TRICKY)
def test_redact_matches_the_five_pass_reference(text: str) -> None:
    assert redact(text) == _reference_redact(text), f"input: {text!r}"


def test_tricky_cases_do_mask_something() -> None:
    """The cases above exercise real masks, not only clean lines."""
    changed = sum(redact(text) != text for text in TRICKY)
    assert changed > len(TRICKY) // 2


def test_typical_t24_line_is_unchanged() -> None:
    line = _T24.format(cid="3f2a9c1e0b7d4e5fa1c2d3e4f5a6b7c8")
    assert redact(line) is line


_FRAGMENTS = [
    "+254712345678",
    "+2547",
    "+",
    "1990-01-02",
    "2024-12-31",
    "a.b@c.io",
    "x@y.co",
    "12345678",
    "1234567",
    "123",
    "token=",
    'password: "',
    "passwd='",
    "secret:",
    "Authorization",
    "authorization: ",
    "TOKEN",
    "ſecret=",
    "İ",
    "٣٤٥",
    "é",
    "…",
    " ",
    "  ",
    "\t",
    "\n",
    "-",
    ".",
    "@",
    "=",
    ":",
    ",",
    "}",
    "'",
    '"',
    "_",
    "*",
    "t24 get_customer page=- attempt=1 status=200 ",
]


def _random_text(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.55:
            parts.append(rng.choice(_FRAGMENTS))
        elif kind < 0.7:
            parts.append("".join(rng.choices(string.digits, k=rng.randint(1, 14))))
        elif kind < 0.85:
            parts.append("".join(rng.choices(string.ascii_letters, k=rng.randint(1, 8))))
        else:
            parts.append("".join(rng.choices("0123456789abcdef", k=rng.randint(1, 32))))
    return "".join(parts)


def test_redact_matches_the_reference_on_random_text() -> None:
    rng = random.Random(20240607)
    masked = 0
    for _ in range(5000):
        text = _random_text(rng)
        expected = _reference_redact(text)
        got = redact(text)
        if got != expected:
            print(f"mismatch for input {text!r}: got {got!r}, expected {expected!r}")
        assert got == expected, f"input: {text!r}"
        masked += expected != text
    assert masked > 1000  # the generator does reach the masks


def test_the_fast_keyword_check_agrees_with_the_regex() -> None:
    """``_has_keyword`` (``str.lower`` + ``in`` for ASCII text, "passw" for both password and
    passwd) may say yes when the (?i) keyword regex finds nothing (the mask then runs for
    nothing), never no when it finds a keyword (a secret would stay in the line)."""
    rng = random.Random(7)
    pieces = ["authorization", "AUTHORIZATION", "Passw", "passwd", "PassWord", "secret",
              "SeCrEt", "token", "tokn", "pass", "secre", "auth", "ſecret", "İ", "x", " ", "=",
              "k", "\u212a"]  # fmt: skip
    samples = ["", "passw", "PASSW", "passwx", "tok en", "s-ecret"] + [
        "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) for _ in range(3000)
    ]
    for text in samples:
        found = re.search(r"(?i)(authorization|password|passwd|secret|token)", text)
        if found is not None:
            assert _has_keyword(text), text
        assert redact(text) == _reference_redact(text), text


def test_filter_masks_the_formatted_message() -> None:
    record = logging.LogRecord(
        "t", logging.INFO, __file__, 1, "lookup %s token=%s", ("+254712345678", "abc"), None
    )
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "lookup +***…78 token=***"
    assert record.args is None


def test_text_formatter_matches_the_stock_one_across_seconds() -> None:
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    ours, stock = TextFormatter(fmt), logging.Formatter(fmt)
    start = 1_790_000_000.0
    for offset in (0.0, 0.0004, 0.5, 0.9996, 1.0, 1.2, 59.999, 3600.7, 0.25, 86_400.001):
        record = logging.LogRecord("regstream.x", logging.INFO, __file__, 1, "m %s", ("a",), None)
        record.created = start + offset
        record.msecs = (record.created - int(record.created)) * 1000
        assert ours.format(record) == stock.format(record)


def test_access_line_targets_keep_paths_and_names_not_values() -> None:
    from regstream.logs import mask_query

    assert mask_query("/api/registrations/12") == "/api/registrations/12"
    assert (
        mask_query("/api/registrations?q=%2B254712345678&status=FAILED&page=2&pageSize=50")
        == "/api/registrations?q=***&status=FAILED&page=2&pageSize=50"
    )
    # a value of the wrong shape for a kept parameter is masked too
    assert mask_query("/x?page=02%2F04%2F1988&status=mary%40example.com") == (
        "/x?page=***&status=***"
    )
    # credentials under any name; a parameter name that is itself data
    assert (
        mask_query("/s?api_key=rst_abc&ticket=t1&token=x") == "/s?api_key=***&ticket=***&token=***"
    )
    assert mask_query("/s?%2B254712345678=1&registrationId=7") == "/s?***=***&registrationId=7"


def _json_line(record: logging.LogRecord) -> dict[str, object]:
    import json

    from regstream.logs import JsonFormatter

    RedactingFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, object] = json.loads(line)
    return parsed


def test_json_lines_carry_every_extra_field_and_a_utc_millisecond_timestamp() -> None:
    record = logging.makeLogRecord({
        "name": "regstream.core_banking", "levelno": logging.INFO, "levelname": "INFO",
        "msg": "t24 %s status=%s", "args": ("get_customer", 200), "created": 1_765_000_000.25,
        "t24_operation": "get_customer", "http_status": 200, "correlation_id": "c0ffee",
        "duration_ms": 51.2,
    })  # fmt: skip
    body = _json_line(record)
    assert body["ts"] == "2025-12-06T05:46:40.250Z"
    assert body["level"] == "INFO" and body["logger"] == "regstream.core_banking"
    assert body["message"] == "t24 get_customer status=200"
    assert body["t24_operation"] == "get_customer" and body["http_status"] == 200
    assert body["correlation_id"] == "c0ffee" and body["duration_ms"] == 51.2


def test_json_lines_mask_personal_data_in_extra_fields_too() -> None:
    record = logging.makeLogRecord({
        "msg": "lookup", "phone": "+254712345678", "note": "born 1988-04-02, id 12345678",
    })  # fmt: skip
    body = _json_line(record)
    assert "712345678" not in repr(body) and "1988-04-02" not in repr(body)
    assert "12345678" not in repr(body)


# --- nested values: extra= fields and arguments, through real loggers and both formatters -----

NATIONAL_ID, PHONE, EMAIL = "29876543", "+254712345678", "jane.doe@example.co.ke"
SECRETS = (NATIONAL_ID, "712345678", EMAIL, "jane.doe")


def _emit(json_format: bool, msg: object, *args: object, **extra: object) -> str:
    """One line through a real logger, ``RedactingFilter`` and our formatter (as ``configure``)."""
    import io

    from regstream.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(
        JsonFormatter() if json_format else TextFormatter("%(levelname)s %(name)s: %(message)s")
    )
    logger = logging.getLogger(f"regstream.test-nested-{json_format}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info(msg, *args, extra=extra or None)
    finally:
        logger.handlers[:] = []
    return stream.getvalue()


def _leaks(line: str) -> list[str]:
    return [secret for secret in SECRETS if secret in line]


@pytest.mark.parametrize("json_format", [True, False], ids=["json", "text"])
def test_personal_data_nested_in_arguments_is_masked(json_format: bool) -> None:
    person = {"national_id": NATIONAL_ID, "contacts": [PHONE, {"email": EMAIL}]}
    line = _emit(json_format, "lookup %s then %r and %s", person, [NATIONAL_ID, (PHONE,)],
                 ValueError("no customer", {"email": EMAIL}))  # fmt: skip
    assert _leaks(line) == [] and "lookup {" in line and "ValueError" not in line, line
    # the bytes of a driver's error
    assert _leaks(_emit(json_format, "raw %s", EMAIL.encode() + b" " + PHONE.encode())) == []


def test_personal_data_nested_in_extra_fields_is_masked_in_json_lines() -> None:
    import json

    line = _emit(
        True, "lookup done",
        person={"national_id": NATIONAL_ID, "contacts": [PHONE, {"email": EMAIL}], "n": 3},
        ids=[NATIONAL_ID, 12, int(NATIONAL_ID)], pair=(PHONE, 1.5), raw=EMAIL.encode(),
        error=KeyError({"phone": PHONE}), tags={EMAIL}, keyed={PHONE: "x", 7: None},
        stage="t24_lookup", attempt=2, duration_ms=51.2, ok=True, nothing=None,
    )  # fmt: skip
    assert _leaks(line) == [], line
    body = json.loads(line)
    # the shapes and the harmless values are kept
    assert body["person"] == {"national_id": "*******", "n": 3,
                              "contacts": ["+***…78", {"email": "***@***"}]}  # fmt: skip
    assert body["ids"] == ["*******", 12, "*******"] and body["pair"] == ["+***…78", 1.5]
    assert body["raw"] == "***@***" and body["tags"] == ["***@***"]
    assert body["error"] == "KeyError: {'phone': '+***…78'}"
    assert body["keyed"] == {"+***…78": "x", "7": None}
    assert (body["stage"], body["attempt"], body["duration_ms"]) == ("t24_lookup", 2, 51.2)
    assert (body["ok"], body["nothing"]) == (True, None)


def test_a_dict_message_is_masked_in_json_lines() -> None:
    line = _emit(True, {"event": "lookup", "who": {"phone": PHONE, "email": EMAIL}})
    assert _leaks(line) == [] and "lookup" in line, line


@pytest.mark.parametrize("json_format", [True, False], ids=["json", "text"])
def test_wrong_arguments_are_masked_not_reported_by_logging(
    json_format: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A format string and arguments that do not match: logging's own error report would print
    the arguments to stderr; the filter logs them masked instead."""
    line = _emit(json_format, "lookup %s %s", NATIONAL_ID)
    assert _leaks(line) == [] and "lookup" in line, line
    assert capsys.readouterr().err == ""


def test_cycles_depth_and_size_are_bounded() -> None:
    import json

    from regstream.logs import MAX_DEPTH, MAX_ITEMS, WITHHELD, redact_value

    loop: list[object] = [PHONE]
    loop.append(loop)
    ring: dict[str, object] = {"email": EMAIL}
    ring["self"] = ring
    deep: object = NATIONAL_ID
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    line = _emit(True, "bounded", loop=loop, ring=ring, deep=deep,
                 many=[PHONE] * (MAX_ITEMS * 10))  # fmt: skip
    assert _leaks(line) == [], line
    body = json.loads(line)
    assert len(body["many"]) == MAX_ITEMS + 1 and body["many"][-1] == WITHHELD
    nested: object = WITHHELD
    for _ in range(MAX_DEPTH):
        nested = [nested]
    assert body["deep"] == nested  # MAX_DEPTH levels, then withheld
    assert WITHHELD in json.dumps([body["loop"], body["ring"]], ensure_ascii=False)

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError(PHONE)

    assert redact_value(Unprintable()) == WITHHELD
    assert redact_value({"a": Unprintable()}) == {"a": WITHHELD}


def test_numbers_long_enough_to_be_an_id_or_a_phone_are_masked_as_floats_too() -> None:
    """A phone or a national id parsed as a number from JSON may be a float."""
    from regstream.logs import redact_value

    assert redact_value(254712345678.0) == "*******"
    assert redact_value({"phone": 254712345678.0, "ids": [12345678.0]}) == {
        "phone": "*******",
        "ids": ["*******"],
    }
    assert redact_value(12.5) == 12.5 and redact_value(999_999.0) == 999_999.0  # durations, sums
    assert redact_value([0.25, True, None]) == [0.25, True, None]


def test_per_logger_levels_enable_one_logger_only() -> None:
    """``REGSTREAM_LOG_LEVELS``: the T24 client's success lines (DEBUG) without DEBUG anywhere
    else; only the service's own loggers may be named (libraries' DEBUG lines carry query
    parameters)."""
    assert parse_levels(" regstream.core_banking.client=debug, regstream=WARNING ,") == (
        ("regstream.core_banking.client", "DEBUG"),
        ("regstream", "WARNING"),
    )
    assert parse_levels("") == ()
    for bad in (
        "httpx=DEBUG",
        "regstreamx=DEBUG",
        "regstream.core_banking.client",
        "regstream=LOUD",
    ):
        with pytest.raises(ValueError):
            parse_levels(bad)
    with pytest.raises(ValueError):  # nor past parse_levels, in code (refused before any change)
        configure("INFO", levels=(("sqlalchemy.engine", "DEBUG"),))
    root = logging.getLogger()
    t24 = logging.getLogger("regstream.core_banking.client")
    handlers, root_level = root.handlers[:], root.level
    # every logger configure touches, as it was (later tests see the logging they expect)
    touched = [logging.getLogger(name) for name in (
        "regstream.core_banking.client", "httpx", "httpcore", "aiosqlite", "asyncpg",
        "sqlalchemy.engine", "uvicorn", "uvicorn.error", "uvicorn.access",
    )]  # fmt: skip
    kept = [(logger.level, logger.handlers[:], logger.propagate) for logger in touched]
    switches = (logging._srcfile, logging.logThreads, logging.logProcesses)
    multiprocessing = logging.logMultiprocessing
    try:
        configure("INFO", levels=parse_levels("regstream.core_banking.client=DEBUG"))
        assert t24.isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("regstream.pipeline").isEnabledFor(logging.DEBUG)
        assert not root.isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)  # setLevel, not .level: it clears the loggers' level caches
        for logger, (level, logger_handlers, propagate) in zip(touched, kept, strict=True):
            logger.setLevel(level)
            logger.handlers[:] = logger_handlers
            logger.propagate = propagate
        logging._srcfile, logging.logThreads, logging.logProcesses = switches
        logging.logMultiprocessing = multiprocessing
