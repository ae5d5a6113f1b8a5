"""Password hashing with argon2id (argon2-cffi), the memory-hard winner of the PHC.

Parameters are argon2-cffi's defaults, RFC 9106's "second recommended" profile: t=3, m=64 MiB,
p=4, about 50 ms per hash here. Hashing runs in a worker thread behind a small semaphore, so a
burst of sign-ins neither blocks the event loop nor allocates 64 MiB per request without bound.
An unknown user name is checked against a dummy hash, so the answer takes the same time.

``HashingTurns`` keeps those few slots fair (issue 16): one client address gets one password
check at a time per process, so a password spray from one address queues behind itself instead
of filling every slot while others wait to sign in, and an address that keeps failing waits
while others check theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import threading
import time
from collections.abc import AsyncIterator

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

MIN_LENGTH = 10
MAX_LENGTH = 1024  # argon2 accepts more; a cap stops a 10 MB "password" from costing anything

_hasher = PasswordHasher()
# a thread semaphore, not an asyncio one: tests run several event loops in one process
_slots = threading.BoundedSemaphore(4)


def check_strength(password: str) -> None:
    """Raise ``ValueError`` with a clear message for a password we refuse to store."""
    if len(password) < MIN_LENGTH:
        raise ValueError(f"password must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"password must be at most {MAX_LENGTH} characters")
    if password.strip() == "" or len(set(password)) < 4:
        raise ValueError("password is too simple")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash("not-a-real-password-only-for-timing")


def verify_password(stored: str | None, password: str) -> bool:
    """``True`` if ``password`` matches ``stored``; ``False`` for no hash (timing kept equal)."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        if stored is None:
            _hasher.verify(_dummy_hash(), password + "x")
            return False
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    return _hasher.check_needs_rehash(stored)


def _verify_bounded(stored: str | None, password: str) -> bool:
    with _slots:
        return verify_password(stored, password)


def _hash_bounded(password: str) -> str:
    with _slots:
        return hash_password(password)


async def verify_password_async(stored: str | None, password: str) -> bool:
    return await asyncio.to_thread(_verify_bounded, stored, password)


async def hash_password_async(password: str) -> str:
    return await asyncio.to_thread(_hash_bounded, password)


class HashingTurns:
    """Fair turns at the password check, per key (a client address): ``async with
    turns.take(ip, name): …`` then ``await turns.failed(ip, name)`` when the password did not
    match.

    * One turn at a time per key: a spray from one address queues behind itself.
    * A client is suspect when its account name failed ``suspect_after`` times from its address
      in the last minute (in this process; one by default), or its address failed
      ``address_suspect_after`` times whatever the names (five by default: one colleague's typo
      does not make a whole office behind one NAT address suspect; a spray of random names is
      after five). A suspect it waits while any other address is at the check, and suspects
      take turns one at a time whatever their address, each followed by a rest of twice its
      length (suspects use at most a third of the time). So a spray, from one address or many,
      competes with a colleague's sign-in for the CPU (argon2 at 64 MiB, four lanes, on a small
      machine) with at most the one hash it had already started, and rarely with that. Nobody
      is refused here (the sign-in rate limits do that), and no answer waits for a rest.

    Per event loop (asyncio locks), so one per app instance; a key's lock is dropped when nobody
    holds or waits for it, so the map holds only addresses signing in right now.
    """

    #: after a suspect's turn, the next suspect waits this many times as long as it took
    SUSPECT_REST = 2.0

    def __init__(self, *, suspect_after: int = 1, address_suspect_after: int = 5) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._failures = MovingWindowRateLimiter(MemoryStorage())
        self._suspect = RateLimitItemPerMinute(suspect_after, namespace="hashing-failures")
        self._address_suspect = RateLimitItemPerMinute(
            address_suspect_after, namespace="hashing-address-failures"
        )
        self._others = 0  # turns of addresses in good standing, being taken or held
        self._others_done = asyncio.Event()
        self._others_done.set()
        self._suspects = asyncio.Lock()  # one suspect's check at a time, whatever its address

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def take(self, key: str, account: str = "") -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                if await self._failures.test(
                    self._suspect, _account_key(key, account)
                ) and await self._failures.test(self._address_suspect, key):
                    self._others += 1
                    self._others_done.clear()
                    try:
                        yield
                    finally:
                        self._others -= 1
                        if self._others == 0:
                            self._others_done.set()
                else:
                    await self._suspects.acquire()
                    rest = 0.0
                    try:
                        while self._others:  # bounded: each of those is one password check
                            await self._others_done.wait()
                        started = time.monotonic()
                        try:
                            yield
                        finally:
                            rest = self.SUSPECT_REST * (time.monotonic() - started)
                    finally:
                        # the next suspect waits a while (not this one's answer): the check is
                        # idle most of the time, so a colleague rarely meets a spray's hash
                        asyncio.get_running_loop().call_later(rest, self._suspects.release)
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    async def failed(self, key: str, account: str = "") -> None:
        """Count a failed check for ``account`` from ``key`` (see the class docstring)."""
        await self._failures.hit(self._suspect, _account_key(key, account))
        await self._failures.hit(self._address_suspect, key)


def _account_key(address: str, account: str) -> str:
    """In-process key of (address, account name): a digest, so typed names (sometimes a
    password typed into the name field) are not kept as they are."""
    digest = hashlib.blake2b(account.casefold().encode(), digest_size=12).hexdigest()
    return f"{address} {digest}"
