"""polyak: TensorFlow's weight-update semantics in eager PyTorch.

Gradients and their processing, optimizer application with a global step, and averaged
("shadow") weights: exponential moving averages and target networks, at memory speed.
"""

from polyak.flat import flatten_parameters_

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "flatten_parameters_",
]
