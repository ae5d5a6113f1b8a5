"""An index on ``registration_requests.updated_at``: the publish catch-up (after a restart or a
Redis outage) pages through the registrations changed within the history's age cap; without it
each page was a full scan of the table, which past REGSTREAM_DB_STATEMENT_TIMEOUT on a large
table never finished.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_registration_requests_updated_at", "registration_requests", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_registration_requests_updated_at", table_name="registration_requests")
