"""TensorFlow 1.x optimizers as ``torch.optim.Optimizer`` subclasses, exactly.

``tf.compat.v1.train``'s ``GradientDescentOptimizer``, ``MomentumOptimizer``,
``AdamOptimizer``, ``RMSPropOptimizer``, ``AdagradOptimizer``, ``AdadeltaOptimizer`` and
``FtrlOptimizer``, with TF1's argument names and defaults (parameters first), slots and update
rules in TF's order of float32 operations, dense and sparse. Param groups carry ``"lr"``, so
torch's LR schedulers and :class:`polyak.Optimizer` drive them. See ``docs/optim.md``.
"""

from polyak.optim.adadelta import AdadeltaOptimizer
from polyak.optim.adagrad import AdagradOptimizer
from polyak.optim.adam import AdamOptimizer
from polyak.optim.ftrl import FtrlOptimizer
from polyak.optim.gradient_descent import GradientDescentOptimizer
from polyak.optim.momentum import MomentumOptimizer
from polyak.optim.rmsprop import RMSPropOptimizer

__all__ = [
    "AdadeltaOptimizer",
    "AdagradOptimizer",
    "AdamOptimizer",
    "FtrlOptimizer",
    "GradientDescentOptimizer",
    "MomentumOptimizer",
    "RMSPropOptimizer",
]
