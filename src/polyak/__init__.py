"""polyak: TensorFlow's weight-update semantics in eager PyTorch.

Gradients and their processing, optimizer application with a global step, and averaged
("shadow") weights: exponential moving averages and target networks, at memory speed.
"""

from polyak.averaging import (
    ExponentialMovingAverage,
    IncompatibleKeys,
    TargetNetwork,
    schedules,
)
from polyak.flat import flatten_parameters_

__version__ = "0.1.0"

__all__ = [
    "ExponentialMovingAverage",
    "IncompatibleKeys",
    "TargetNetwork",
    "__version__",
    "flatten_parameters_",
    "schedules",
]
