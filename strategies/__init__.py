"""Aggregation rules, DP mechanisms and privacy accounting; knows nothing of Flower's transport.

Built so far (the differential-privacy issue, first part): L2 clipping that
never increases a norm (:func:`clip_l2`) and the randomised Hadamard rotation
used before distributed-DP quantisation (:func:`rotate` / :func:`unrotate`).
"""

from strategies.clipping import ClipResult, clip_l2
from strategies.rotation import padded_length, rotate, unrotate

__all__ = ["ClipResult", "clip_l2", "padded_length", "rotate", "unrotate"]
