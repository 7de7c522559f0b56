"""segcli: coarse-to-fine segmentation of large medical images.

The public Python API lives in :mod:`segcli.api`; the command line in :mod:`segcli.cli` is a thin
wrapper over it. Heavy modules (torch, SimpleITK) are imported lazily so ``segcli --help`` is fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
