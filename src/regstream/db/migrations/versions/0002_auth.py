"""Back-office accounts: operators, API tokens, sessions, stream tickets, audit log.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_tz = sa.DateTime(timezone=True)


def _operator_fk() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "operator_id", _id, sa.ForeignKey("operators.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255)),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("last_login_at", _tz),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        _operator_fk(),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("label", sa.String(64)),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger()),
        sa.Column("revoked_ms", sa.BigInteger()),
    )
    op.create_index("ix_api_tokens_operator_id", "api_tokens", ["operator_id"])
    op.create_table(
        "auth_sessions",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("session_hash", sa.String(64), nullable=False, unique=True),
        _operator_fk(),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_ms", sa.BigInteger()),
    )
    op.create_index("ix_auth_sessions_operator_id", "auth_sessions", ["operator_id"])
    op.create_index("ix_auth_sessions_expires_ms", "auth_sessions", ["expires_ms"])
    op.create_table(
        "stream_tickets",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("ticket_hash", sa.String(64), nullable=False, unique=True),
        _operator_fk(),
        sa.Column("credential_kind", sa.String(8), nullable=False),
        sa.Column("credential_id", sa.BigInteger(), nullable=False),
        sa.Column("registration_id", sa.BigInteger()),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("used_ms", sa.BigInteger()),
    )
    op.create_index("ix_stream_tickets_expires_ms", "stream_tickets", ["expires_ms"])
    op.create_table(
        "audit_log",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("actor", sa.String(64)),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("target", sa.String(200)),
        sa.Column("client_ip", sa.String(45)),
        sa.Column("details", sa.JSON()),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_actor", "audit_log", ["actor"])
    op.create_index("ix_audit_log_action", "audit_log", ["action"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("stream_tickets")
    op.drop_table("auth_sessions")
    op.drop_table("api_tokens")
    op.drop_table("operators")
