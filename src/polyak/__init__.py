"""polyak: TensorFlow's weight-update semantics in eager PyTorch.

Gradients and their processing, optimizer application with a global step, and averaged
("shadow") weights: exponential moving averages and target networks, at memory speed.
"""

from polyak import optim, schedules, transforms
from polyak.averaging import (
    ExponentialMovingAverage,
    IncompatibleKeys,
    PostHocEMA,
    TargetNetwork,
)
from polyak.flat import flatten_parameters_
from polyak.grad import (
    Optimizer,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    global_norm,
    gradients,
    stop_gradient,
)
from polyak.step import GlobalStep

__version__ = "0.1.0"

__all__ = [
    "ExponentialMovingAverage",
    "GlobalStep",
    "IncompatibleKeys",
    "Optimizer",
    "PostHocEMA",
    "TargetNetwork",
    "__version__",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "flatten_parameters_",
    "global_norm",
    "gradients",
    "optim",
    "schedules",
    "stop_gradient",
    "transforms",
]
