"""The embedded run's claim reads the next job of the warm shape from an index, in the order work was asked for,
instead of sorting every queued job of the batch for each claim: (status, model) becomes
(status, model, shape, ordinal).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 04:00:00.000000

"""
from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0012'
down_revision: str | Sequence[str] | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_status_model')
        batch_op.create_index('ix_jobs_claim', ['status', 'model', 'shape', 'ordinal'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_claim')
        batch_op.create_index('ix_jobs_status_model', ['status', 'model'], unique=False)
