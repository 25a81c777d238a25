"""Loading plans: how a worker loaded the model for each attempt and output, and what each worker has loaded;
where a resubmitted job's fresh attempt budget starts; when a job's report arrived; a reference's content hash.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 17:40:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    for table in ('attempts', 'outputs', 'workers'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('plan', sa.String(length=120), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('budget_from', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('reported_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('reference_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('reference_sha256')
        batch_op.drop_column('reported_at')
        batch_op.drop_column('budget_from')
    for table in ('workers', 'outputs', 'attempts'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('plan')
