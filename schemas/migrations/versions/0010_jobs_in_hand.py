"""A worker holds several jobs at once (a render message of one shape): its heartbeats name them all.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 17:00:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0010'
down_revision: str | Sequence[str] | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema: what a worker is doing is refreshed by its next heartbeat, so nothing is carried over."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rendering', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('storing', sa.JSON(), nullable=True))
        batch_op.drop_column('current_job')
        batch_op.drop_column('finishing')


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('finishing', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('current_job', sa.String(length=32), nullable=True))
        batch_op.drop_column('storing')
        batch_op.drop_column('rendering')
