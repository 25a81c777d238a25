"""The feeder's publishing order kept on each job (priority, ordinal) and indexed, so that choosing a queue's next
jobs reads a few index entries instead of sorting every queued job of every batch.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 01:00:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0011'
down_revision: str | Sequence[str] | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema, and give every job its place from the batches that ask for it."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('ordinal', sa.BigInteger(), nullable=True))
    seconds = ("CAST(FLOOR(EXTRACT(EPOCH FROM b.created_at)) AS BIGINT)" if op.get_bind().dialect.name == "postgresql"
               else "CAST(strftime('%s', b.created_at) AS INTEGER)")
    # as dispatcher.store.ordinal and store.reprioritize compute them
    op.execute("UPDATE jobs SET "
               "priority = (SELECT max(b.priority) FROM batch_jobs bj JOIN batches b ON b.id = bj.batch_id "
               "WHERE bj.job_id = jobs.id AND NOT b.paused), "
               f"ordinal = (SELECT min({seconds} * 4294967296 + bj.position) FROM batch_jobs bj "
               "JOIN batches b ON b.id = bj.batch_id WHERE bj.job_id = jobs.id)")
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_ready', ['queue', 'status', sa.literal_column('priority DESC'), 'ordinal'],
                              unique=False)
        batch_op.create_index('ix_jobs_published', ['queue', 'status'], unique=False,
                              postgresql_where=sa.text('published_at IS NOT NULL'),
                              sqlite_where=sa.text('published_at IS NOT NULL'))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_published')
        batch_op.drop_index('ix_jobs_ready')
        batch_op.drop_column('ordinal')
        batch_op.drop_column('priority')
