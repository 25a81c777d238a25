"""Models per worker: which models' weights a worker has, why it does not serve others, why it takes no work at
all, and how often it loaded each model. Render queues become per model (kiln.render.<model>.vram<class>): the
queued jobs of an older database move to their model's queue.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 20:40:00.000000

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('models', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('unserved', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('problem', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('model_loads', sa.JSON(), nullable=True))
    from schemas.capacity import queue_name

    jobs = sa.table('jobs', sa.column('model', sa.String), sa.column('queue', sa.String))
    conn = op.get_bind()
    pairs = conn.execute(sa.select(jobs.c.model, jobs.c.queue).where(jobs.c.queue.like('kiln.render.vram%'))
                         .distinct()).all()
    for model, queue in pairs:
        tier = int(queue.removeprefix('kiln.render.vram'))
        conn.execute(sa.update(jobs).where(jobs.c.model == model, jobs.c.queue == queue)
                     .values(queue=queue_name(model, tier)))


def downgrade() -> None:
    """Downgrade schema."""
    jobs = sa.table('jobs', sa.column('queue', sa.String))
    conn = op.get_bind()
    for (queue,) in conn.execute(sa.select(jobs.c.queue).distinct()).all():
        if queue and not queue.startswith('kiln.render.vram'):
            conn.execute(sa.update(jobs).where(jobs.c.queue == queue)
                         .values(queue='kiln.render.vram' + queue.rpartition('.vram')[2]))
    with op.batch_alter_table('workers', schema=None) as batch_op:
        for column in ('model_loads', 'problem', 'unserved', 'models'):
            batch_op.drop_column(column)
