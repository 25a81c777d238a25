"""Webhooks: an outbox of events (job.dead, batch.finished) and when a batch finished.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 21:50:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'events',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('payload', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_at', sa.DateTime(), nullable=False),
        sa.Column('delivered_at', sa.DateTime(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_events')),
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_events_delivered_at'), ['delivered_at'], unique=False)
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(), nullable=True))
    # Batches that were already done before this upgrade are finished, quietly: no burst of batch.finished events
    # for last month's work.
    op.execute("UPDATE batches SET finished_at = created_at WHERE NOT EXISTS (SELECT 1 FROM batch_jobs "
               "JOIN jobs ON jobs.id = batch_jobs.job_id WHERE batch_jobs.batch_id = batches.id "
               "AND jobs.status IN ('queued', 'running'))")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_column('finished_at')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_events_delivered_at'))
    op.drop_table('events')
