"""Unit tests of ``regstream.auth``: passwords, tokens, roles, rate limits, request helpers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from regstream.api.errors import too_many_requests
from regstream.auth import http, passwords, tokens
from regstream.auth.credentials import check_username, parse_role
from regstream.auth.limits import LimitStore, RateLimit, retry_after
from regstream.auth.principal import Role
from regstream.auth.runtime import guard_interval
from regstream.config import ConfigError, Settings, load_settings


def test_password_hash_is_argon2id_and_verifies() -> None:
    stored = passwords.hash_password("correct horse battery")
    assert stored.startswith("$argon2id$")
    assert "m=65536" in stored  # memory-hard: 64 MiB
    assert passwords.verify_password(stored, "correct horse battery") is True
    assert passwords.verify_password(stored, "correct horse batterY") is False
    assert passwords.verify_password(None, "anything at all") is False
    assert passwords.verify_password("not-a-hash", "anything at all") is False
    assert passwords.verify_password(stored, "x" * 5000) is False


@pytest.mark.parametrize(
    ("password", "message"),
    [
        pytest.param("short", "at least 10", id="short"),
        pytest.param("a" * 12, "too simple", id="one-char"),
        pytest.param(" " * 12, "too simple", id="blank"),
        pytest.param("x" * 1025, "at most 1024", id="huge"),
    ],
)
def test_weak_passwords_are_refused(password: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        passwords.check_strength(password)


def test_api_tokens_are_random_prefixed_and_hashed() -> None:
    token, stored, prefix = tokens.new_api_token()
    other, _, _ = tokens.new_api_token()
    assert token.startswith("rst_") and len(token) >= 40 and token != other
    assert stored == tokens.digest(token) and len(stored) == 64 and token not in stored
    assert prefix == token[:8]
    assert tokens.is_api_token(token) and not tokens.is_ticket(token)
    ticket = tokens.new_ticket()
    assert tokens.is_ticket(ticket) and not tokens.is_api_token(ticket)
    assert tokens.same("abc", "abc") and not tokens.same("abc", "abd")


def test_roles_are_ordered() -> None:
    assert Role.ADMIN.includes(Role.OPERATOR) and Role.OPERATOR.includes(Role.VIEWER)
    assert not Role.VIEWER.includes(Role.OPERATOR)
    assert parse_role(" Admin ") is Role.ADMIN
    with pytest.raises(ValueError, match="viewer, operator or admin"):
        parse_role("root")


@pytest.mark.parametrize(
    ("name", "ok"),
    [("kim", True), ("Kim.Ops", True), ("a", False), ("../etc", False), ("a b", False),
     ("x" * 64, False), ("ünïcode", False), ("kim_2-b", True)],
)  # fmt: skip
def test_usernames(name: str, ok: bool) -> None:
    if ok:
        assert check_username(name) == name.lower()
    else:
        with pytest.raises(ValueError):
            check_username(name)


async def test_rate_limit_without_redis_counts_in_memory_and_reports_the_wait() -> None:
    limit = RateLimit(LimitStore(None, secret=b"k"), "t", 2)
    assert await limit.hit("a") == 0.0 and await limit.hit("a") == 0.0
    wait = await limit.hit("a")
    assert 59.0 < wait <= 60.0
    assert await limit.hit("b") == 0.0  # keys are independent
    assert await limit.hit("b", cost=2) > 0.0  # a bulk cost past what is left does not fit
    assert retry_after(0.2) == "1" and retry_after(29.1) == "30"
    refusal = too_many_requests("slow down", 29.1)  # what every API limit raises
    assert (refusal.status_code, refusal.detail) == (429, "slow down")
    assert refusal.headers == {"Retry-After": "30"}


def test_limit_keys_are_keyed_digests() -> None:
    one, other = LimitStore(None, secret=b"k1"), LimitStore(None, secret=b"k2")
    assert one.digest("10.0.0.9", "kim") == LimitStore(None, secret=b"k1").digest("10.0.0.9", "kim")
    assert one.digest("10.0.0.9", "kim") != other.digest("10.0.0.9", "kim")
    assert "10.0.0.9" not in one.digest("10.0.0.9") and len(one.digest("x")) == 24


async def test_hashing_turns_serialise_one_address_not_others() -> None:
    turns = passwords.HashingTurns()
    order: list[str] = []
    release = asyncio.Event()

    async def hold(key: str, tag: str) -> None:
        async with turns.take(key):
            order.append(f"{tag}+")
            if tag == "a1":
                await release.wait()
            order.append(f"{tag}-")

    first = asyncio.create_task(hold("1.1.1.1", "a1"))
    second = asyncio.create_task(hold("1.1.1.1", "a2"))
    other = asyncio.create_task(hold("2.2.2.2", "b"))
    await asyncio.wait_for(other, 5)  # another address is not held up
    assert order == ["a1+", "b+", "b-"]
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert order[3:] == ["a1-", "a2+", "a2-"]
    assert len(turns) == 0  # nothing kept for addresses that are done


async def test_hashing_turns_put_failing_addresses_behind_others_one_at_a_time() -> None:
    turns = passwords.HashingTurns()
    await turns.failed("6.6.6.1")
    await turns.failed("6.6.6.2")
    order: list[str] = []
    colleague_in, release_colleague, release_first = (asyncio.Event() for _ in range(3))

    async def colleague() -> None:
        async with turns.take("1.1.1.1"):
            order.append("colleague+")
            colleague_in.set()
            await release_colleague.wait()
            order.append("colleague-")

    async def suspect(key: str) -> None:
        async with turns.take(key):
            order.append(f"{key}+")
            if key.endswith(".1"):
                await release_first.wait()
            order.append(f"{key}-")

    good = asyncio.create_task(colleague())
    await asyncio.wait_for(colleague_in.wait(), 5)
    sprays = [asyncio.create_task(suspect(k)) for k in ("6.6.6.1", "6.6.6.2")]
    await asyncio.sleep(0.05)  # (they would have started by now if they could)
    assert order == ["colleague+"]  # suspects wait while a colleague is at the check
    release_colleague.set()
    await asyncio.wait_for(good, 5)
    await wait_for_order(order, 3)
    assert order[2] == "6.6.6.1+"  # then one suspect at a time, whatever its address
    await asyncio.sleep(0.05)
    assert len(order) == 3
    release_first.set()
    await asyncio.wait_for(asyncio.gather(*sprays), 5)
    assert order[3:] == ["6.6.6.1-", "6.6.6.2+", "6.6.6.2-"]


async def wait_for_order(order: list[str], length: int) -> None:
    for _ in range(100):  # bounded: 1 s
        if len(order) >= length:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"only {order}")


def _scope(headers: dict[str, str], scheme: str = "http", method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http", "method": method, "scheme": scheme, "client": ("10.0.0.9", 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip


def _settings(**kw: Any) -> Settings:
    return Settings(**kw)


@pytest.mark.parametrize(
    ("headers", "cross"),
    [
        pytest.param({"Host": "ops.bank"}, False, id="no-browser-headers"),
        pytest.param({"Host": "ops.bank", "Origin": "http://ops.bank"}, False, id="same-origin"),
        pytest.param({"Host": "ops.bank", "Origin": "https://evil.example"}, True, id="other"),
        pytest.param({"Host": "ops.bank", "Origin": "null"}, True, id="null-origin"),
        pytest.param({"Host": "ops.bank", "Sec-Fetch-Site": "cross-site"}, True, id="fetch-cross"),
        pytest.param({"Host": "ops.bank", "Sec-Fetch-Site": "same-site"}, True, id="sibling"),
        pytest.param({"Host": "ops.bank", "Sec-Fetch-Site": "same-origin"}, False, id="fetch-same"),
        pytest.param(
            {"Host": "ops.bank", "Origin": "https://ops.example"}, False, id="cors-allowed"
        ),
    ],
)
def test_cross_site_detection(headers: dict[str, str], cross: bool) -> None:
    settings = _settings(cors_origins="https://ops.example")
    assert http.cross_site(_scope(headers), settings) is cross


def test_forwarded_headers_only_with_trust_proxy() -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7, 10.0.0.1"}
    scope = _scope(headers)
    untrusted, trusted = _settings(), _settings(trust_proxy=True)
    assert http.cookie_secure(scope, untrusted) is False
    assert http.client_ip(scope, untrusted) == "10.0.0.9"
    assert http.cookie_secure(scope, trusted) is True
    assert http.client_ip(scope, trusted) == "203.0.113.7"
    assert http.cookie_secure(_scope({}), _settings(cookie_secure="always")) is True
    assert http.cookie_secure(_scope({}, scheme="https"), _settings(cookie_secure="never")) is False


def test_credentials_are_read_from_the_scope() -> None:
    scope = _scope({"Authorization": "Bearer rst_x", "Cookie": "a=1; regstream_session=abc"})
    assert http.bearer_token(scope) == "rst_x"
    assert http.session_cookie(scope) == "abc"
    assert http.bearer_token(_scope({"Authorization": "Basic x"})) == ""
    assert http.bearer_token(_scope({})) is None
    assert http.session_cookie(_scope({"Cookie": "\x00;;=="})) is None


def test_cors_origins_setting_is_validated() -> None:
    assert load_settings(cors_origins="https://a.example, http://b:81/").cors_origins == (
        "https://a.example", "http://b:81",
    )  # fmt: skip
    for bad in ("*", "ftp://x", "https://a.example/path", "nonsense"):
        with pytest.raises(ConfigError, match="REGSTREAM_CORS_ORIGINS"):
            load_settings(cors_origins=bad)


def test_open_streams_are_rechecked_within_the_ping_interval() -> None:
    assert guard_interval(30.0) == 10.0
    assert guard_interval(2.0) == 1.0
    assert guard_interval(0.1) == 0.25


async def test_one_colleagues_typo_does_not_make_an_office_address_suspect() -> None:
    """Suspects are kept behind everyone else. Behind one NAT address, one person's failed
    sign-in makes that person suspect, not the office; five failures with any names (a spray
    of random names) make the address suspect (review of issue 16's fair turns)."""
    turns = passwords.HashingTurns()
    office = "10.9.9.9"
    await turns.failed(office, "kim")

    async def suspect(address: str, name: str) -> bool:
        """Whether a check of ``name`` from ``address`` waits behind another address's."""
        held, release = asyncio.Event(), asyncio.Event()

        async def other() -> None:
            async with turns.take("192.0.2.1", "someone"):
                held.set()
                await release.wait()

        holder = asyncio.create_task(other())
        await held.wait()
        checking = asyncio.create_task(_enter(turns, address, name))
        await asyncio.sleep(0.05)
        waits = not checking.done()
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, checking), 5)
        return waits

    assert await suspect(office, "kim")  # the one who failed
    assert not await suspect(office, "lee")  # a colleague at the same address
    for name in ("a1", "a2", "a3", "a4"):
        await turns.failed(office, name)
    assert await suspect(office, "lee")  # five failures from the address: a spray


async def _enter(turns: passwords.HashingTurns, address: str, name: str) -> None:
    async with turns.take(address, name):
        pass
