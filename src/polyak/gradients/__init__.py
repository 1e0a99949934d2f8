"""Gradients and their application: ``tf.gradients``, clipping, ``tf.train.Optimizer``.

See ``docs/gradients.md`` for the guide and the TensorFlow mapping.
"""

from polyak.gradients import transforms
from polyak.gradients.clipping import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from polyak.gradients.functional import gradients, stop_gradient
from polyak.gradients.global_step import GlobalStep
from polyak.gradients.optimizer import Optimizer

__all__ = [
    "GlobalStep",
    "Optimizer",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "global_norm",
    "gradients",
    "stop_gradient",
    "transforms",
]
