"""Aggregation rules, DP mechanisms and privacy accounting; knows nothing of Flower's transport.

Built by the differential-privacy issue; empty until then.
"""

__all__: list[str] = []
