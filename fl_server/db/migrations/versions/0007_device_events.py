"""Store the signed events devices publish over MQTT, one per (device, seq).

Revision ID: 0007_device_events
Revises: 0006_audit_checkpoints
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_device_events"
down_revision = "0006_audit_checkpoints"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("event_time", sa.Float(), nullable=False),
        sa.Column("received_at", sa.String(length=40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("certificate", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_events")),
        sa.UniqueConstraint("device_id", "seq", name=op.f("uq_device_events_device_id")),
    )
    op.create_index(op.f("ix_device_events_kind"), "device_events", ["kind"])
    op.create_index(op.f("ix_device_events_received_at"), "device_events", ["received_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_device_events_received_at"), table_name="device_events")
    op.drop_index(op.f("ix_device_events_kind"), table_name="device_events")
    op.drop_table("device_events")
