"""Create the privacy ledger: what each round of a run spent, per subject.

Revision ID: 0002_privacy_ledger
Revises: 0001_audit_log
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_privacy_ledger"
down_revision = "0001_audit_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_ledger",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("server_round", sa.Integer(), nullable=False),
        sa.Column("mechanism", sa.String(length=32), nullable=False),
        sa.Column("rho", sa.Float(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=True),
        sa.Column("sample_rate", sa.Float(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.Column("recorded_at", sa.String(length=40), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_ledger")),
        sa.UniqueConstraint(
            "run_id", "subject", "server_round", name=op.f("uq_privacy_ledger_run_id")
        ),
    )
    op.create_index(op.f("ix_privacy_ledger_run_id"), "privacy_ledger", ["run_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_privacy_ledger_run_id"), table_name="privacy_ledger")
    op.drop_table("privacy_ledger")
