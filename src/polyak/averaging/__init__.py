"""Averaged ("shadow") weights: exponential moving averages and target networks."""

from polyak.averaging import schedules
from polyak.averaging.ema import ExponentialMovingAverage, IncompatibleKeys
from polyak.averaging.target import TargetNetwork

__all__ = ["ExponentialMovingAverage", "IncompatibleKeys", "TargetNetwork", "schedules"]
