"""Aggregation rules, DP mechanisms and privacy accounting; knows nothing of Flower's transport.

Built so far (the differential-privacy issue, first part): L2 clipping that
never increases a norm (:func:`clip_l2`), the randomised Hadamard rotation
used before distributed-DP quantisation (:func:`rotate` / :func:`unrotate`),
accounting (:func:`gaussian_epsilon` through Opacus' RDP/PRV accountants,
:func:`ddg_rho` for the distributed discrete Gaussian, :func:`zcdp_epsilon`), and
the distributed-DP encoding a client applies before secure aggregation
(:func:`ddp_encode` / :func:`ddp_decode_sum`, scale chosen so the sum never wraps).
"""

from strategies.accounting import (
    AccountantKind,
    GaussianSteps,
    composed_epsilon,
    ddg_rho,
    gaussian_epsilon,
    zcdp_epsilon,
)
from strategies.clipping import ClipResult, clip_l2
from strategies.ddp import DdpConfig, choose_gamma, ddp_decode_sum, ddp_encode
from strategies.rotation import rotate, rotated_length, unrotate

__all__ = [
    "AccountantKind",
    "ClipResult",
    "DdpConfig",
    "GaussianSteps",
    "choose_gamma",
    "clip_l2",
    "composed_epsilon",
    "ddg_rho",
    "ddp_decode_sum",
    "ddp_encode",
    "gaussian_epsilon",
    "rotate",
    "rotated_length",
    "unrotate",
    "zcdp_epsilon",
]
