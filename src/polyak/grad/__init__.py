"""Gradients and their application: ``tf.gradients``, clipping, gradient transforms and
``tf.train.Optimizer``.

The package is ``polyak.grad`` because ``polyak.gradients`` is the function (``tf.gradients``);
the transforms' public path is ``polyak.transforms``. See ``docs/gradients.md`` for the guide
and the TensorFlow mapping.
"""

from polyak.grad import transforms
from polyak.grad.clipping import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from polyak.grad.functional import gradients, stop_gradient
from polyak.grad.optimizer import Optimizer

__all__ = [
    "Optimizer",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "gradients",
    "stop_gradient",
    "transforms",
]
