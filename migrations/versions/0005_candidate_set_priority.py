"""candidate set priority: the reward ensemble's disagreement on a set, the order annotators get sets in when active
learning is on

Revision ID: c6e3f4051627
Revises: a4c1d2e3f405
Create Date: 2026-12-02 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = 'c6e3f4051627'
down_revision: str | None = 'a4c1d2e3f405'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('candidate_sets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('candidate_sets', schema=None) as batch_op:
        batch_op.drop_column('priority')
