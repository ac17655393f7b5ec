"""The cloud model store."""
