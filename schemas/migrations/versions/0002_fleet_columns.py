"""Fleet columns: batch priority and pause, job queue and backoff, verified checksums, worker state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 18:26:11.637393

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('paused', sa.Boolean(), server_default=sa.false(), nullable=False))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('min_vram_gb', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('queue', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('published_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('not_before', sa.DateTime(), nullable=True))

    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('md5', sa.String(length=32), nullable=True))
        batch_op.alter_column('sha256',
               existing_type=sa.VARCHAR(length=64),
               nullable=True)

    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queues', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('loaded_model', sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column('current_job', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('step', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('seconds_per_image', sa.Float(), nullable=True))



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('seconds_per_image')
        batch_op.drop_column('step')
        batch_op.drop_column('current_job')
        batch_op.drop_column('loaded_model')
        batch_op.drop_column('queues')

    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.alter_column('sha256',
               existing_type=sa.VARCHAR(length=64),
               nullable=False)
        batch_op.drop_column('md5')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('not_before')
        batch_op.drop_column('published_at')
        batch_op.drop_column('queue')
        batch_op.drop_column('min_vram_gb')

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_column('paused')
        batch_op.drop_column('priority')

