"""Decay schedules, at their public path ``polyak.schedules``.

The implementation lives in :mod:`polyak.averaging.schedules` (the averaging layer); this
module names the same objects, so ``import polyak.schedules`` and
``from polyak.schedules import warmup`` work as the docs write them.
"""

from polyak.averaging.schedules import *  # noqa: F403
from polyak.averaging.schedules import __all__  # noqa: F401
