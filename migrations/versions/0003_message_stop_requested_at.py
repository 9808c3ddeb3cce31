"""message stop requested at: Stop recorded on the message, heard by whichever web process streams it

Revision ID: 8d4f2a6c1e73
Revises: 5b1e7d2a9c40
Create Date: 2026-12-01 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models


revision: str = '8d4f2a6c1e73'
down_revision: str | None = '5b1e7d2a9c40'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stop_requested_at', app.models.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('stop_requested_at')
