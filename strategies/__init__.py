"""Aggregation rules, DP mechanisms and privacy accounting; knows nothing of Flower's transport.

Built so far (the differential-privacy issue, first part): L2 clipping that
never increases a norm (:func:`clip_l2`), the randomised Hadamard rotation
used before distributed-DP quantisation (:func:`rotate` / :func:`unrotate`),
and accounting (:func:`gaussian_epsilon` through Opacus' RDP/PRV accountants,
:func:`ddg_rho` for the distributed discrete Gaussian, :func:`zcdp_epsilon`).
"""

from strategies.accounting import (
    AccountantKind,
    GaussianSteps,
    ddg_rho,
    gaussian_epsilon,
    zcdp_epsilon,
)
from strategies.clipping import ClipResult, clip_l2
from strategies.rotation import padded_length, rotate, unrotate

__all__ = [
    "AccountantKind",
    "ClipResult",
    "GaussianSteps",
    "clip_l2",
    "ddg_rho",
    "gaussian_epsilon",
    "padded_length",
    "rotate",
    "unrotate",
    "zcdp_epsilon",
]
