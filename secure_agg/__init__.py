"""SecAgg+ maths and protocol state machines; pure: stdlib, numpy and cryptography only.

Built by the secure-aggregation issue; empty until then.
"""

__all__: list[str] = []
