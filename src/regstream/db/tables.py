"""ORM tables. Field rules come from DOMAIN.md section 2.

Personal data stays in ``registration_requests`` (what the person submitted, needed to run the
checks) and ``mobile_users`` (enrolled users; their national id only as a keyed hash + last 4).
``process_log`` holds one row per published update of a registration (``seq`` 1, 2, 3 ... without
gaps): it is the source of truth for snapshots and for crash recovery.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# SQLite only auto-increments INTEGER PRIMARY KEY; BigInteger elsewhere.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class RegistrationRequest(Base):
    __tablename__ = "registration_requests"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    customer_number: Mapped[str] = mapped_column(String(10))
    account_number: Mapped[str | None] = mapped_column(String(34))
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    date_of_birth: Mapped[date] = mapped_column(Date)
    national_id: Mapped[str] = mapped_column(String(40))
    id_type: Mapped[str] = mapped_column(String(40))
    phone: Mapped[str] = mapped_column(String(16))
    email: Mapped[str | None] = mapped_column(String(254))
    device_id: Mapped[str | None] = mapped_column(String(128))

    status: Mapped[str] = mapped_column(String(16), default="PENDING", index=True)
    current_stage: Mapped[str | None] = mapped_column(String(32))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    run_count: Mapped[int] = mapped_column(Integer, default=0)
    in_progress: Mapped[bool] = mapped_column(Boolean, default=False)
    run_id: Mapped[str | None] = mapped_column(String(36))
    lease_expires_ms: Mapped[int | None] = mapped_column(BigInteger)
    # the instance (``instances.id``) that holds the run; NULL while it waits in the shared
    # queue; after the run, the instance that ended it (db/work_queue.py)
    instance_id: Mapped[str | None] = mapped_column(String(32))
    started_by: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_registration_requests_in_progress", "in_progress"),
        # the publish catch-up's pages (registrations.changed_since; migration 0005)
        Index("ix_registration_requests_updated_at", "updated_at"),
    )


class ProcessLogEntry(Base):
    __tablename__ = "process_log"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    # indexed by uq_process_log_seq (registration_id, seq): no index of its own (migration 0003)
    registration_id: Mapped[int] = mapped_column(
        ForeignKey("registration_requests.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    run: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str | None] = mapped_column(String(32))
    stage_status: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(300))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("registration_id", "seq", name="uq_process_log_seq"),)


class MobileUser(Base):
    __tablename__ = "mobile_users"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    customer_number: Mapped[str] = mapped_column(String(10), unique=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    phone: Mapped[str] = mapped_column(String(16), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    date_of_birth: Mapped[date] = mapped_column(Date)
    national_id_hash: Mapped[str] = mapped_column(String(64), unique=True)
    national_id_last4: Mapped[str] = mapped_column(String(4))
    device_id: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    registration_id: Mapped[int | None] = mapped_column(BigInteger)
    enrolled_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Instance(Base):
    """A running (or stopped) ``regstream serve`` process: its heartbeat tells the fleet it is
    alive. Runs held by an instance whose heartbeat is older than ``REGSTREAM_HEARTBEAT_TIMEOUT``
    are taken over by the others (db/work_queue.py). ``host``/``pid``/``version`` are for
    operators."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat_ms: Mapped[int] = mapped_column(BigInteger)
    stopped_ms: Mapped[int | None] = mapped_column(BigInteger)  # a clean shutdown


# --- back-office accounts (issue 4; docs/security.md) -------------------------------------------
# Secrets are never stored in clear: passwords as argon2id hashes, API tokens, session ids and
# stream tickets as SHA-256 hex digests of the random value handed to the client. Instants that
# are compared (expiry, revocation) are epoch milliseconds, like ``lease_expires_ms``.


class Operator(Base):
    """A back-office account (``viewer``, ``operator`` or ``admin``)."""

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    last_login_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    operator_id: Mapped[int] = mapped_column(
        ForeignKey("operators.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_ms: Mapped[int | None] = mapped_column(BigInteger)
    revoked_ms: Mapped[int | None] = mapped_column(BigInteger)


class AuthSession(Base):
    """A signed-in browser: the cookie holds a random id, this row holds its hash."""

    __tablename__ = "auth_sessions"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    operator_id: Mapped[int] = mapped_column(
        ForeignKey("operators.id", ondelete="CASCADE"), index=True
    )
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    revoked_ms: Mapped[int | None] = mapped_column(BigInteger)


class StreamTicket(Base):
    """A single-use, short-lived credential for ``?ticket=`` on the stream path only."""

    __tablename__ = "stream_tickets"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    ticket_hash: Mapped[str] = mapped_column(String(64), unique=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id", ondelete="CASCADE"))
    # the credential the ticket was minted from: the stream lives and dies with it
    credential_kind: Mapped[str] = mapped_column(String(8))
    credential_id: Mapped[int] = mapped_column(BigInteger)
    registration_id: Mapped[int | None] = mapped_column(BigInteger)
    expires_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    used_ms: Mapped[int | None] = mapped_column(BigInteger)


class AuditEntry(Base):
    """Who signed in, who started which run, who was refused. No personal data, no secrets."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    actor: Mapped[str | None] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(40), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    target: Mapped[str | None] = mapped_column(String(200))
    client_ip: Mapped[str | None] = mapped_column(String(45))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
