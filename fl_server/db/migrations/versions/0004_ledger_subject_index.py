"""Index the privacy ledger by subject: a client's lifetime total reads its rows of every run.

Revision ID: 0004_ledger_subject_index
Revises: 0003_model_store
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0004_ledger_subject_index"
down_revision = "0003_model_store"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_privacy_ledger_subject"), "privacy_ledger", ["subject"])


def downgrade() -> None:
    op.drop_index(op.f("ix_privacy_ledger_subject"), table_name="privacy_ledger")
