"""role requests (a user asks for the annotator role, an admin decides) and the effective parameters of a job (what
its trainer ran with, defaults filled in)

Revision ID: d7f4a5162738
Revises: c6e3f4051627
Create Date: 2026-12-03 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models


revision: str = 'd7f4a5162738'
down_revision: str | None = 'c6e3f4051627'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('role_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column(
        'status',
        sa.Enum('pending', 'approved', 'rejected', name='role_request_status', native_enum=False, create_constraint=True,
                length=32),
        nullable=False,
    ),
    sa.Column('message', sa.String(length=500), nullable=True),
    sa.Column('created_at', app.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('decided_at', app.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('decided_by_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['decided_by_id'], ['users.id'], name=op.f('fk_role_requests_decided_by_id_users'),
                            ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_role_requests_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_role_requests')),
    sa.UniqueConstraint('user_id', name=op.f('uq_role_requests_user_id'))
    )
    with op.batch_alter_table('role_requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_role_requests_status'), ['status'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('effective_params', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('effective_params')

    with op.batch_alter_table('role_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_role_requests_status'))

    op.drop_table('role_requests')
