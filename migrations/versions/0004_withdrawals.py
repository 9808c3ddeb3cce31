"""withdrawals: what authors took back (ids only); rankings outlive their annotator's account, anonymised

Also removes what earlier versions left in the prompt pool: chat prompts whose conversation was deleted (their
source message was set to NULL) or no longer allows training, with their candidate sets and rankings.

Revision ID: a4c1d2e3f405
Revises: 8d4f2a6c1e73
Create Date: 2026-12-02 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.models


revision: str = 'a4c1d2e3f405'
down_revision: str | None = '8d4f2a6c1e73'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('withdrawals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('conversation_ids', sa.JSON(), nullable=False),
    sa.Column('prompt_ids', sa.JSON(), nullable=False),
    sa.Column('ranking_ids', sa.JSON(), nullable=False),
    sa.Column('feedback_ids', sa.JSON(), nullable=False),
    sa.Column('created_at', app.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_withdrawals'))
    )
    with op.batch_alter_table('withdrawals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_withdrawals_created_at'), ['created_at'], unique=False)

    with op.batch_alter_table('rankings', schema=None) as batch_op:
        batch_op.alter_column('annotator_id', existing_type=sa.Integer(), nullable=True)
        batch_op.drop_constraint('fk_rankings_annotator_id_users', type_='foreignkey')
        batch_op.create_foreign_key(
            batch_op.f('fk_rankings_annotator_id_users'), 'users', ['annotator_id'], ['id'], ondelete='SET NULL'
        )

    # Chat prompts whose source is gone or no longer allows training: the candidate sets, candidates, rankings and
    # entries built on them go with them (ON DELETE CASCADE).
    op.execute(
        "DELETE FROM prompts WHERE source = 'chat' AND (source_message_id IS NULL OR source_message_id IN ("
        "SELECT messages.id FROM messages JOIN conversations ON conversations.id = messages.conversation_id "
        "WHERE NOT conversations.allow_training))"
    )


def downgrade() -> None:
    op.execute("DELETE FROM rankings WHERE annotator_id IS NULL")  # anonymised rankings have no annotator to name
    with op.batch_alter_table('rankings', schema=None) as batch_op:
        batch_op.drop_constraint('fk_rankings_annotator_id_users', type_='foreignkey')
        batch_op.create_foreign_key(
            batch_op.f('fk_rankings_annotator_id_users'), 'users', ['annotator_id'], ['id'], ondelete='CASCADE'
        )
        batch_op.alter_column('annotator_id', existing_type=sa.Integer(), nullable=False)

    with op.batch_alter_table('withdrawals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_withdrawals_created_at'))

    op.drop_table('withdrawals')
