"""One secret for the fleet (issue 15): a shared database needs REGSTREAM_SECRET_KEY; key
rotation keeps existing national-id hashes matching; ``regstream rotate-secret`` moves them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import select

from regstream.config import ConfigError, Settings, load_settings
from regstream.core_banking.simulator.dataset import load_applicant
from regstream.db import registrations, users
from regstream.db.engine import create_engine, create_session_factory, migrate
from regstream.db.key_rotation import Rotation, rotate
from regstream.db.tables import MobileUser
from regstream.domain.pii import NationalIdKeys, hash_national_id
from regstream.stack import national_id_keys
from tests.conftest import SettingsFactory
from tests.support import LiveServer, StreamClient, auth_headers, run_in_db, serve_app

KEY_A = "a-key-of-the-old-days-0123456789abcdef"
KEY_B = "b-key-of-the-new-days-0123456789abcdef"
ENV_DROP = ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "T24_BASE_URL")


# --- settings ------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*ENV_DROP, "REGSTREAM_SECRET_KEY", "REGSTREAM_PREVIOUS_SECRET_KEYS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_shared_database_without_a_secret_key_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URL", "postgresql://regstream@db/regstream")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "invalid configuration: REGSTREAM_SECRET_KEY is required with DATABASE_URL: without it "
        "each instance generates its own key and hashes national ids differently, so the "
        "duplicate check and the unique index on the hash silently stop working; set the same "
        "key of at least 32 characters on every instance (e.g. openssl rand -hex 32)"
    )
    clean_env.setenv("REGSTREAM_SECRET_KEY", KEY_A)
    assert load_settings().secret_key == SecretStr(KEY_A)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        pytest.param("k" * 31, "must be at least 32 characters", id="short"),
        pytest.param(
            " " + "k" * 32, "must not contain commas or surrounding whitespace", id="space"
        ),
        pytest.param("k" * 16 + "," + "k" * 16, "must not contain commas", id="comma"),
    ],
)
def test_a_weak_or_unlistable_secret_key_is_refused_in_one_line(
    clean_env: pytest.MonkeyPatch, key: str, problem: str
) -> None:
    clean_env.setenv("REGSTREAM_SECRET_KEY", key)
    with pytest.raises(ConfigError) as info:
        load_settings()
    text = str(info.value)
    assert text.startswith(f"invalid configuration: REGSTREAM_SECRET_KEY: {problem}")
    assert "\n" not in text and key.strip() not in text


def test_previous_keys_are_a_masked_comma_separated_list(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REGSTREAM_SECRET_KEY", KEY_B)
    clean_env.setenv("REGSTREAM_PREVIOUS_SECRET_KEYS", f" {KEY_A} , short-legacy-key,")
    settings = load_settings()
    assert [k.get_secret_value() for k in settings.previous_secret_keys] == [
        KEY_A,
        "short-legacy-key",  # a key in use before the length check still matches
    ]
    assert KEY_A not in repr(settings) and "legacy" not in repr(settings)
    keys = national_id_keys(settings)
    assert keys == NationalIdKeys(KEY_B.encode(), (KEY_A.encode(), b"short-legacy-key"))
    assert KEY_A not in repr(keys)
    assert keys.hashes("NATIONAL.ID", " 123 ") == (
        hash_national_id(KEY_B.encode(), "NATIONAL.ID", "123"),
        hash_national_id(KEY_A.encode(), "NATIONAL.ID", "123"),
        hash_national_id(b"short-legacy-key", "NATIONAL.ID", "123"),
    )

    clean_env.setenv("REGSTREAM_PREVIOUS_SECRET_KEYS", KEY_B)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value) == (
        "invalid configuration: REGSTREAM_PREVIOUS_SECRET_KEYS repeats REGSTREAM_SECRET_KEY: the "
        "current key must be the new one (docs/operations.md)"
    )


def test_the_embedded_database_keeps_its_generated_key(tmp_path: Path) -> None:
    """Without DATABASE_URL the key is generated once into the data dir (0600) and reused."""
    settings = Settings(data_dir=tmp_path / "var")
    first = national_id_keys(settings)
    assert national_id_keys(Settings(data_dir=tmp_path / "var")) == first
    path = tmp_path / "var" / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.current == path.read_text().encode() and len(first.current) == 64
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no draft left


def test_serve_with_a_shared_database_and_no_secret_exits_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP and "SECRET" not in k}
    env.update(
        DATABASE_URL="postgresql://regstream:db-password-canary@127.0.0.1:1/regstream",
        REGSTREAM_DATA_DIR=str(tmp_path / "var"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "regstream", "serve", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        "error: invalid configuration: REGSTREAM_SECRET_KEY is required with DATABASE_URL: "
    )
    assert "canary" not in done.stderr
    assert not (tmp_path / "var").exists()  # refused before anything started or was written


# --- rotation, through the service ---------------------------------------------------------------


async def _validate(live: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    """Create (or re-use) the registration and validate it; its final update."""
    headers = auth_headers(live, "admin")
    async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=20) as http:
        created = await http.post("/api/registrations", json=body)
        assert created.status_code == 201, created.text
        rid = created.json()["id"]
        async with StreamClient(live.url, headers=headers, registration_id=rid) as sse:
            assert (await http.post(f"/api/registrations/{rid}/process")).status_code == 202
            return await sse.wait_final(rid)


def _stored_hash(live: LiveServer, customer_number: str) -> str:
    async def read(session: Any) -> str:
        user = await users.get_by_customer_number(session, customer_number=customer_number)
        assert user is not None
        return user.national_id_hash

    return str(run_in_db(live, read))


def _nid_hash(key: str, body: dict[str, Any]) -> str:
    return hash_national_id(key.encode(), body["idType"], body["nationalId"])


async def test_a_user_enrolled_under_the_previous_key_is_still_a_duplicate(
    make_settings: SettingsFactory, postgres_url: str
) -> None:
    enrolled = load_applicant(1)
    # another CIF (and phone) presenting the enrolled person's national id
    impostor = {**load_applicant(2), "nationalId": enrolled["nationalId"]}

    with serve_app(make_settings(database_url=postgres_url, secret_key=SecretStr(KEY_A))) as live:
        assert (await _validate(live, enrolled))["status"] == "APPROVED"
        assert _stored_hash(live, enrolled["customerNumber"]) == _nid_hash(KEY_A, enrolled)

    # the new key alone does not know the old hash: the duplicate check lets the id through (the
    # run fails later, at T24's KYC check, because the core's record has another id)
    with serve_app(make_settings(database_url=postgres_url, secret_key=SecretStr(KEY_B))) as live:
        final = await _validate(live, impostor)
        assert [(e["stage"], e["status"]) for e in final["processLog"]][:2] == [
            ("duplicate_check", "started"),
            ("duplicate_check", "completed"),
        ]
        assert final["details"]["error"] == "KYC_MISMATCH"

    rotated = make_settings(
        database_url=postgres_url, secret_key=SecretStr(KEY_B),
        previous_secret_keys=(SecretStr(KEY_A),),
    )  # fmt: skip
    with serve_app(rotated) as live:
        final = await _validate(live, impostor)
        assert final["status"] == "FAILED"
        assert final["details"] == {"error": "ID_ALREADY_ENROLLED", "retryable": False}
        assert [(e["stage"], e["status"]) for e in final["processLog"]] == [
            ("duplicate_check", "started"),
            ("duplicate_check", "failed"),
            ("status_update", "started"),
            ("status_update", "completed"),
        ]
        # the person registering again: recognised (the identity check matches the old hash),
        # nothing about them changed, and their hash moves to the current key
        final = await _validate(live, enrolled)
        assert (final["status"], final["details"]) == (
            "DUPLICATE",
            {"existingUserId": final["details"]["existingUserId"]},
        )
        assert _stored_hash(live, enrolled["customerNumber"]) == _nid_hash(KEY_B, enrolled)
        # a new person enrols under the current key
        newcomer = load_applicant(3)
        assert (await _validate(live, newcomer))["status"] == "APPROVED"
        assert _stored_hash(live, newcomer["customerNumber"]) == _nid_hash(KEY_B, newcomer)


# --- rotate-secret -------------------------------------------------------------------------------


def _rotate(tmp_path: Path, database_url: str, **keys: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP and "SECRET" not in k}
    env.update(DATABASE_URL=database_url, REGSTREAM_DATA_DIR=str(tmp_path / "var"), **keys)
    return subprocess.run(
        [sys.executable, "-m", "regstream", "rotate-secret", "--batch", "2"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_rotate_secret_moves_every_hash_it_can_to_the_current_key(
    tmp_path: Path, make_settings: SettingsFactory, postgres_url: str
) -> None:
    people = [load_applicant(n) for n in (11, 12, 13)]
    with serve_app(make_settings(database_url=postgres_url, secret_key=SecretStr(KEY_A))) as live:
        # the demo set (into the empty database) pre-enrols two users with no linked registration
        assert await live.load_demo()
        for body in people:
            assert (await _validate(live, body))["status"] == "APPROVED"

        async def hashes(session: Any) -> dict[str, str]:
            rows = await session.execute(
                select(MobileUser.customer_number, MobileUser.national_id_hash)
            )
            return dict(rows.all())

        before = run_in_db(live, hashes)
    demo = {cif: h for cif, h in before.items() if cif not in {p["customerNumber"] for p in people}}
    assert len(demo) == 2  # the demo's two pre-enrolled users (made with the tests' key)

    done = _rotate(
        tmp_path, postgres_url, REGSTREAM_SECRET_KEY=KEY_B, REGSTREAM_PREVIOUS_SECRET_KEYS=KEY_A
    )
    assert done.stderr == ""
    # the demo users' registrations share their CIF, but their hashes were made with a third
    # key (the tests' own): matching no configured key, they are left as they are
    assert done.stdout.splitlines() == [
        "re-hashed 3 enrolled users with the current key (0 were on it already)",
        "2 users keep a hash of another key (0 with no registration holding their national id, "
        "2 matching no configured key, 0 enrolled twice under two keys): keep "
        "REGSTREAM_PREVIOUS_SECRET_KEYS until they register again",
    ]
    assert done.returncode == 1
    with serve_app(make_settings(database_url=postgres_url, secret_key=SecretStr(KEY_B))) as live:
        after = run_in_db(live, hashes)
        assert after == {
            **{p["customerNumber"]: _nid_hash(KEY_B, p) for p in people},
            **demo,
        }
        # with the new key alone, the moved hashes are found again
        impostor = {**load_applicant(14), "nationalId": people[0]["nationalId"]}
        final = await _validate(live, impostor)
        assert final["details"]["error"] == "ID_ALREADY_ENROLLED"

    # the demo users' key as a previous one too: now everyone can be moved, and a second run of
    # the same rotation finds nothing left to do
    from tests.support import TEST_SECRET_KEY

    both = f"{KEY_A},{TEST_SECRET_KEY}"
    done = _rotate(
        tmp_path, postgres_url, REGSTREAM_SECRET_KEY=KEY_B, REGSTREAM_PREVIOUS_SECRET_KEYS=both
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        "re-hashed 2 enrolled users with the current key (3 were on it already)",
        "every enrolled user is on the current key: the previous keys can be retired",
    ]


# --- rotate(), on both databases -----------------------------------------------------------------


def _person(n: int, national_id: str) -> dict[str, Any]:
    return dict(
        customer_number=f"5000{n:02d}", account_number=None, first_name="Rota", last_name="Tion",
        date_of_birth=date(1980, 1, 1), national_id=national_id, id_type="NATIONAL.ID",
        phone=f"+2547100000{n:02d}", email=None, device_id=None,
    )  # fmt: skip


async def _enrol(session: Any, person: dict[str, Any], key: str, *, linked: bool) -> None:
    reg = await registrations.create(session, **person)
    await users.create(
        session,
        users.enrolment(
            customer_number=person["customer_number"], first_name="Rota", last_name="Tion",
            phone=person["phone"], email=None, date_of_birth=person["date_of_birth"],
            national_id_hash=hash_national_id(key.encode(), "NATIONAL.ID", person["national_id"]),
            national_id_last4=person["national_id"][-4:], device_id=None,
            registration_id=reg.id if linked else None,
        ),
    )  # fmt: skip


async def test_rotate_counts_what_it_cannot_move(database_url: str) -> None:
    """Batches of one: a user under A moves, one under B stays, one linked only by CIF moves,
    one whose registration was never stored is unlinked, and one person enrolled under both
    keys (the roll-out window) is a conflict: the unique index keeps the existing B hash."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        sessions = create_session_factory(engine)
        async with sessions.begin() as session:
            await _enrol(session, _person(1, "81000001"), KEY_A, linked=True)
            await _enrol(session, _person(2, "81000002"), KEY_B, linked=True)
            await _enrol(session, _person(3, "81000003"), KEY_A, linked=False)  # by CIF
            await users.create(  # enrolled with no registration anywhere (like a hand import)
                session,
                users.enrolment(
                    customer_number="500004", first_name="Rota", last_name="Tion",
                    phone="+254710000004", email=None, date_of_birth=date(1980, 1, 1),
                    national_id_hash="0" * 64, national_id_last4="0000", device_id=None,
                ),
            )  # fmt: skip
            await _enrol(session, _person(5, "81000005"), KEY_A, linked=True)
            await _enrol(session, _person(6, "81000005"), KEY_B, linked=True)  # same person
        keys = NationalIdKeys(KEY_B.encode(), (KEY_A.encode(),))

        done = await rotate(sessions, keys, batch=1)
        assert done == Rotation(rehashed=2, current=2, unlinked=1, unmatched=0, conflicts=1)
        assert done.left == 2
        async with sessions() as session:
            stored = dict(
                (
                    await session.execute(
                        select(MobileUser.customer_number, MobileUser.national_id_hash)
                    )
                ).all()
            )
        assert stored == {
            "500001": hash_national_id(KEY_B.encode(), "NATIONAL.ID", "81000001"),
            "500002": hash_national_id(KEY_B.encode(), "NATIONAL.ID", "81000002"),
            "500003": hash_national_id(KEY_B.encode(), "NATIONAL.ID", "81000003"),
            "500004": "0" * 64,
            "500005": hash_national_id(KEY_A.encode(), "NATIONAL.ID", "81000005"),
            "500006": hash_national_id(KEY_B.encode(), "NATIONAL.ID", "81000005"),
        }
        # without the previous key nothing can be moved: what is not current matches no key
        again = await rotate(sessions, NationalIdKeys(KEY_B.encode()), batch=1)
        assert again == Rotation(rehashed=0, current=4, unlinked=1, unmatched=1, conflicts=0)
    finally:
        await engine.dispose()
