"""Render parameters added after the first release travel in one JSON column (schemas.params.RenderParams), and
each job names its shape: the jobs that can share one pipeline call, found by one equality.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 08:00:00.000000

"""
import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHUNK = 1000


def _shape(model: str, width: int, height: int, steps: int, guidance: float, reference: str | None,
           reference_sha256: str | None) -> str:
    """RenderParams.shape as it is for a job whose later parameters are all at their default (every job here)."""
    blob = json.dumps([model, width, height, steps, guidance, reference, reference_sha256], ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('params', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('shape', sa.String(length=32), nullable=True))
    jobs = sa.table('jobs', *(sa.column(c) for c in ('id', 'model', 'width', 'height', 'steps', 'guidance',
                                                     'reference', 'reference_sha256', 'shape')))
    bind = op.get_bind()
    last = ''
    while True:  # by id, a chunk at a time: one pass over the table, however big
        rows = bind.execute(sa.select(jobs).where(jobs.c.id > last).order_by(jobs.c.id).limit(CHUNK)).all()
        if not rows:
            break
        last = rows[-1].id
        bind.execute(sa.update(jobs).where(jobs.c.id == sa.bindparam('job')).values(shape=sa.bindparam('value')),
                     [{'job': r.id, 'value': _shape(r.model, r.width, r.height, r.steps, r.guidance, r.reference,
                                                    r.reference_sha256)} for r in rows])
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('shape', existing_type=sa.String(length=32), nullable=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('shape')
        batch_op.drop_column('params')
