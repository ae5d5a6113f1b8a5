"""Move enrolled users' national-id hashes to the current key (``regstream rotate-secret``).

The national id itself is never stored with the user (only its HMAC); it is read again from the
registrations that name the user: the one that enrolled it (``mobile_users.registration_id``) and
any other with the same CIF (a user enrolled by the demo loader has no linked registration). A
user's hash moves when one of those ids hashes to it under a previous key; the update names the
old hash, so a hash the service moved meanwhile (an update of that user) is left alone.

Safe to run while the service runs, and again (it only counts users already on the current key).
Users it cannot move keep matching only while their key stays in
``REGSTREAM_PREVIOUS_SECRET_KEYS`` (docs/operations.md, "Rotating the secret key").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Row, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from regstream.db.tables import MobileUser, RegistrationRequest
from regstream.domain.pii import NationalIdKeys

BATCH = 500  # users per transaction


@dataclass
class Rotation:
    """Counts of enrolled users by what ``rotate`` found (never who)."""

    rehashed: int = 0  # moved from a previous key to the current one
    current: int = 0  # already hashed with the current key
    unlinked: int = 0  # no registration holds their national id: cannot be re-hashed
    unmatched: int = 0  # their registrations' ids hash to it under none of the configured keys
    conflicts: int = 0  # another user already holds the current key's hash of the same id

    @property
    def left(self) -> int:
        """Users whose hash the current key did not make (after this run)."""
        return self.unlinked + self.unmatched + self.conflicts


async def rotate(
    sessions: async_sessionmaker[AsyncSession], keys: NationalIdKeys, *, batch: int = BATCH
) -> Rotation:
    """Re-hash every enrolled user it can with ``keys.current``, ``batch`` users per
    transaction."""
    result = Rotation()
    after = 0
    while True:
        async with sessions.begin() as session:
            users = (
                await session.execute(
                    select(
                        MobileUser.id, MobileUser.customer_number, MobileUser.registration_id,
                        MobileUser.national_id_hash,
                    )
                    .where(MobileUser.id > after)
                    .order_by(MobileUser.id)
                    .limit(batch)
                )
            ).all()  # fmt: skip
            if not users:
                return result
            after = users[-1].id
            await _rotate_batch(session, keys, users, result)


async def _rotate_batch(
    session: AsyncSession,
    keys: NationalIdKeys,
    users: Sequence[Row[int, str, int | None, str]],
    result: Rotation,
) -> None:
    ids = {u.registration_id for u in users if u.registration_id is not None}
    cifs = {u.customer_number for u in users}
    regs = (
        await session.execute(
            select(
                RegistrationRequest.id, RegistrationRequest.customer_number,
                RegistrationRequest.id_type, RegistrationRequest.national_id,
            ).where(
                or_(RegistrationRequest.id.in_(ids), RegistrationRequest.customer_number.in_(cifs))
            )
        )
    ).all()  # fmt: skip
    by_id = {r.id: (r.id_type, r.national_id) for r in regs}
    by_cif: dict[str, set[tuple[str, str]]] = {}
    for r in regs:
        by_cif.setdefault(r.customer_number, set()).add((r.id_type, r.national_id))

    moves: dict[int, tuple[str, str]] = {}  # user id -> (old hash, new hash)
    for user in users:
        people = set(by_cif.get(user.customer_number, ()))
        if user.registration_id in by_id:
            people.add(by_id[user.registration_id])
        if not people:
            result.unlinked += 1
            continue
        hashes = [keys.hashes(id_type, national_id) for id_type, national_id in people]
        if any(user.national_id_hash == h[0] for h in hashes):
            result.current += 1
            continue
        new = next((h[0] for h in hashes if user.national_id_hash in h[1:]), None)
        if new is None:
            result.unmatched += 1
            continue
        moves[user.id] = (user.national_id_hash, new)

    # the unique index on the hash: a person enrolled twice (once under each key, only possible
    # while instances with different current keys ran side by side) keeps both hashes
    taken = set(
        (
            await session.scalars(
                select(MobileUser.national_id_hash).where(
                    MobileUser.national_id_hash.in_([new for _, new in moves.values()])
                )
            )
        ).all()
    )
    for user_id, (old, new) in moves.items():
        if new in taken:
            result.conflicts += 1
            continue
        taken.add(new)
        done = await session.execute(
            update(MobileUser)
            .where(MobileUser.id == user_id, MobileUser.national_id_hash == old)
            .values(national_id_hash=new)
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            result.rehashed += 1
        else:  # the service moved it meanwhile (an update of this user)
            result.current += 1
