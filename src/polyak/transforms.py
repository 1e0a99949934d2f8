"""Gradient transforms, at their public path ``polyak.transforms``.

The implementation lives in :mod:`polyak.grad.transforms` (the gradients layer); this module
names the same objects, so ``import polyak.transforms as T`` and
``from polyak.transforms import clip_by_global_norm`` work as the docs write them.
"""

from polyak.grad.transforms import *  # noqa: F403
from polyak.grad.transforms import __all__  # noqa: F401
