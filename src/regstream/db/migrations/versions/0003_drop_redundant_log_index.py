"""Drop process_log's single-column index on registration_id.

The unique constraint ``uq_process_log_seq`` (registration_id, seq) is an index whose leading
column is registration_id: every lookup by registration id (a registration's log, in seq order)
can use it. The extra index only cost every log row insert one more B-tree insert, seven per
validation.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_process_log_registration_id", "process_log")


def downgrade() -> None:
    op.create_index("ix_process_log_registration_id", "process_log", ["registration_id"])
