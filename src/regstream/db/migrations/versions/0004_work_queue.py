"""The shared work queue: the instance holding each run, and the instances' heartbeats.

``registration_requests.instance_id`` is the instance that holds a run (NULL: queued, any
instance may take it); ``instances`` has one row per ``regstream serve`` process with its
heartbeat (db/work_queue.py, docs/architecture.md "Crash recovery").

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("registration_requests", sa.Column("instance_id", sa.String(32)))
    op.create_table(
        "instances",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("heartbeat_ms", sa.BigInteger(), nullable=False),
        sa.Column("stopped_ms", sa.BigInteger()),
    )


def downgrade() -> None:
    op.drop_table("instances")
    with op.batch_alter_table("registration_requests") as batch:
        batch.drop_column("instance_id")
