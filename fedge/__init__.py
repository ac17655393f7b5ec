"""fedge: privacy-centred federated learning for edge fleets, built on Flower.

This package holds only the ``fedge`` command's root (:mod:`fedge.cli`) and two
dependency-free modules every layer may use: :mod:`fedge.errors` and
:mod:`fedge.version`. It deliberately imports nothing at package import time.
"""

from fedge.version import __version__

__all__ = ["__version__"]
