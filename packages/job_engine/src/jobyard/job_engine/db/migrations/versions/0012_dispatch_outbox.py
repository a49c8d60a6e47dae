"""dispatch_outbox: jobs dispatched inside the caller's transaction, waiting for a relay.

Revision ID: 0012_dispatch_outbox
Revises: 0011_flow_collapsed
Create Date: 2026-12-07

`dispatch_job(..., connection=)` inserts a row in the caller's transaction; the relay of every
`jobyard worker` and `jobyard temporal-worker` sends committed rows to an engine and deletes
them (jobyard/job_engine/db/dispatch_outbox.py). On PostgreSQL a statement trigger NOTIFYs the
channel `jobyard_dispatch_outbox` (delivered at commit, never for a rollback), which wakes the
relays at once; SQLite has no NOTIFY, and its relays look every JOBYARD_DISPATCH_RELAY_POLL.
Not the job log's Dramatiq outbox (migration 0008, a Redis stream's ids).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_dispatch_outbox"
down_revision = "0011_flow_collapsed"
branch_labels = None
depends_on = None

#: jobyard.job_engine.db.dispatch_outbox.NOTIFY_CHANNEL (spelled here: a migration stays as it
#: was written).
_NOTIFY = """
CREATE FUNCTION jobyard_dispatch_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('jobyard_dispatch_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER dispatch_outbox_notify AFTER INSERT ON dispatch_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION jobyard_dispatch_outbox_notify();
"""


def upgrade() -> None:
    op.create_table(
        "dispatch_outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("job_id", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("queue", sa.String(128), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("options", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.Float(), nullable=False),
        sa.Column("available_at", sa.Float(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dispatch_outbox"),
        sa.UniqueConstraint("job_id", name="uq_dispatch_outbox_job_id"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NOTIFY)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS dispatch_outbox_notify ON dispatch_outbox")
        op.execute("DROP FUNCTION IF EXISTS jobyard_dispatch_outbox_notify()")
    op.drop_table("dispatch_outbox")
