"""Create device enrolment: one-time tokens (hashed) and the device registry.

Revision ID: 0005_enrolment
Revises: 0004_ledger_subject_index
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_enrolment"
down_revision = "0004_ledger_subject_index"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "enrolment_tokens",
        sa.Column("id", _ID, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.String(length=40), nullable=False),
        sa.Column("expires_at", sa.String(length=40), nullable=False),
        sa.Column("used_at", sa.String(length=40), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrolment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrolment_tokens_token_hash")),
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=32), nullable=False),
        sa.Column("supernode_public_key", sa.Text(), nullable=False),
        sa.Column("supernode_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("identity_public_key", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.BigInteger(), nullable=True),
        sa.Column("enrolled_at", sa.String(length=40), nullable=False),
        sa.Column("token_id", _ID, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("revoked_at", sa.String(length=40), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["enrolment_tokens.id"],
            name=op.f("fk_devices_token_id_enrolment_tokens"),
        ),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
        sa.UniqueConstraint("supernode_key_sha256", name=op.f("uq_devices_supernode_key_sha256")),
        sa.UniqueConstraint("identity_public_key", name=op.f("uq_devices_identity_public_key")),
        sa.UniqueConstraint("node_id", name=op.f("uq_devices_node_id")),
        sa.UniqueConstraint("token_id", name=op.f("uq_devices_token_id")),
    )
    op.create_index(op.f("ix_devices_status"), "devices", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_devices_status"), table_name="devices")
    op.drop_table("devices")
    op.drop_table("enrolment_tokens")
