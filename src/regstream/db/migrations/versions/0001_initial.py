"""Registration requests, process log, enrolled mobile users.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_tz = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "registration_requests",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("customer_number", sa.String(10), nullable=False),
        sa.Column("account_number", sa.String(34)),
        sa.Column("first_name", sa.String(100), nullable=False),
        sa.Column("last_name", sa.String(100), nullable=False),
        sa.Column("date_of_birth", sa.Date(), nullable=False),
        sa.Column("national_id", sa.String(40), nullable=False),
        sa.Column("id_type", sa.String(40), nullable=False),
        sa.Column("phone", sa.String(16), nullable=False),
        sa.Column("email", sa.String(254)),
        sa.Column("device_id", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_stage", sa.String(32)),
        sa.Column("result", sa.JSON()),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("in_progress", sa.Boolean(), nullable=False),
        sa.Column("run_id", sa.String(36)),
        sa.Column("lease_expires_ms", sa.BigInteger()),
        sa.Column("started_by", sa.String(100)),
        sa.Column("created_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("completed_at", _tz),
    )
    op.create_index("ix_registration_requests_status", "registration_requests", ["status"])
    op.create_index(
        "ix_registration_requests_in_progress", "registration_requests", ["in_progress"]
    )
    op.create_table(
        "process_log",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column(
            "registration_id",
            _id,
            sa.ForeignKey("registration_requests.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(32)),
        sa.Column("stage_status", sa.String(16)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.String(300), nullable=False),
        sa.Column("details", sa.JSON()),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("registration_id", "seq", name="uq_process_log_seq"),
    )
    op.create_index("ix_process_log_registration_id", "process_log", ["registration_id"])
    op.create_table(
        "mobile_users",
        sa.Column("id", _id, primary_key=True, autoincrement=True),
        sa.Column("customer_number", sa.String(10), nullable=False, unique=True),
        sa.Column("first_name", sa.String(100), nullable=False),
        sa.Column("last_name", sa.String(100), nullable=False),
        sa.Column("phone", sa.String(16), nullable=False, unique=True),
        sa.Column("email", sa.String(254)),
        sa.Column("date_of_birth", sa.Date(), nullable=False),
        sa.Column("national_id_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("national_id_last4", sa.String(4), nullable=False),
        sa.Column("device_id", sa.String(128)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registration_id", sa.BigInteger()),
        sa.Column("enrolled_at", _tz, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _tz, server_default=sa.func.now(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mobile_users")
    op.drop_index("ix_process_log_registration_id", "process_log")
    op.drop_table("process_log")
    op.drop_table("registration_requests")
