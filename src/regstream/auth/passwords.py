"""Password hashing with argon2id (argon2-cffi), the memory-hard winner of the PHC.

Parameters are argon2-cffi's defaults, RFC 9106's "second recommended" profile: t=3, m=64 MiB,
p=4, about 50 ms per hash here. Hashing runs in a worker thread behind a small semaphore, so a
burst of sign-ins neither blocks the event loop nor allocates 64 MiB per request without bound.
An unknown user name is checked against a dummy hash, so the answer takes the same time.
"""

from __future__ import annotations

import asyncio
import functools
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

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
