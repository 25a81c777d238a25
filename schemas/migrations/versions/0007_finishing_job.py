"""A worker's job whose image is being stored while the next one renders (heartbeats name it), and how long
its model loads took (kept out of its seconds per image).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 00:10:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('finishing', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('load_seconds', sa.JSON(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('load_seconds')
        batch_op.drop_column('finishing')
