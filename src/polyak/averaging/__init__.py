"""Averaged ("shadow") weights: exponential moving averages and target networks."""

from polyak.averaging import schedules  # public path: polyak.schedules
from polyak.averaging.ema import ExponentialMovingAverage, IncompatibleKeys
from polyak.averaging.multi import EMAGroup
from polyak.averaging.posthoc import PostHocEMA
from polyak.averaging.target import TargetNetwork

__all__ = [
    "EMAGroup",
    "ExponentialMovingAverage",
    "IncompatibleKeys",
    "PostHocEMA",
    "TargetNetwork",
    "schedules",
]
