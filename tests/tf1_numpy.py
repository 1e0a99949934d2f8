"""TF1's optimizer kernels (tensorflow/core/kernels/training_ops.cc) written op by op in NumPy,
for tests: every operation of the kernel, in its order, in ``dtype``; hyper-parameters become
float32 first (TF's ``convert_to_tensor``) and are then cast, as TF's optimizers do.

An independent statement of the rules polyak.optim implements: NumPy's arithmetic (and its
``sqrt``) is IEEE, so float32/float64 results here are the bits TF computes where TF's own
kernels are exact (everything but Eigen's vectorized ``rsqrt`` and ``pow``).
"""

from __future__ import annotations

import numpy as np


def hyper(x: float, dtype) -> np.floating:
    return dtype(np.float32(x))


class Reference:
    """Dense steps of one TF1 optimizer on one variable: ``step(var, grad, lr) -> var``."""

    def __init__(self, name: str, kwargs: dict, var: np.ndarray) -> None:
        self.name, self.kw, self.dt = name, kwargs, var.dtype.type
        self.one = self.dt(1)
        zeros = np.zeros_like(var)
        if name == "AdamOptimizer":
            self.m, self.v = zeros.copy(), zeros.copy()
            self.b1p = np.float32(kwargs.get("beta1", 0.9))
            self.b2p = np.float32(kwargs.get("beta2", 0.999))
        elif name == "RMSPropOptimizer":
            self.rms, self.mom, self.mg = np.ones_like(var), zeros.copy(), zeros.copy()
        elif name == "MomentumOptimizer":
            self.accum = zeros.copy()
        elif name in ("AdagradOptimizer", "FtrlOptimizer"):
            self.accum = np.full_like(var, kwargs.get("initial_accumulator_value", 0.1))
            self.linear = zeros.copy()
        elif name == "AdadeltaOptimizer":
            self.accum, self.accum_update = zeros.copy(), zeros.copy()

    def h(self, key: str, default: float) -> np.floating:
        return hyper(self.kw.get(key, default), self.dt)

    def step(self, var: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
        dt, one = self.dt, self.one
        lr_t = hyper(lr, dt)
        if self.name == "GradientDescentOptimizer":
            return var - g * lr_t
        if self.name == "MomentumOptimizer":
            mom = self.h("momentum", 0.0)
            self.accum = self.accum * mom + g
            if self.kw.get("use_nesterov", False):
                return var - (g * lr_t + self.accum * mom * lr_t)
            return var - self.accum * lr_t
        if self.name == "AdamOptimizer":
            b1, b2, eps = self.h("beta1", 0.9), self.h("beta2", 0.999), self.h("epsilon", 1e-8)
            b1p, b2p = dt(self.b1p), dt(self.b2p)
            alpha = lr_t * np.sqrt(one - b2p) / (one - b1p)
            self.m = self.m + (g - self.m) * (one - b1)
            self.v = self.v + (g * g - self.v) * (one - b2)
            var = var - (self.m * alpha) / (np.sqrt(self.v) + eps)
            self.b1p = np.float32(self.b1p * np.float32(self.kw.get("beta1", 0.9)))
            self.b2p = np.float32(self.b2p * np.float32(self.kw.get("beta2", 0.999)))
            return var
        if self.name == "RMSPropOptimizer":
            rho, mom_c, eps = (
                self.h("decay", 0.9),
                self.h("momentum", 0.0),
                self.h("epsilon", 1e-10),
            )
            self.rms = self.rms + (g * g - self.rms) * (one - rho)
            if self.kw.get("centered", False):
                self.mg = self.mg + (g - self.mg) * (one - rho)
                denom = (self.rms - self.mg * self.mg) + eps
            else:
                denom = self.rms + eps
            self.mom = self.mom * mom_c + (g * lr_t) / np.sqrt(denom)
            return var - self.mom
        if self.name == "AdagradOptimizer":
            self.accum = self.accum + g * g
            return var - g * lr_t * (one / np.sqrt(self.accum))
        if self.name == "AdadeltaOptimizer":
            rho, eps = self.h("rho", 0.95), self.h("epsilon", 1e-8)
            self.accum = self.accum * rho + g * g * (one - rho)
            update = np.sqrt(self.accum_update + eps) * (one / np.sqrt(self.accum + eps)) * g
            var = var - update * lr_t
            self.accum_update = self.accum_update * rho + update * update * (one - rho)
            return var
        if self.name == "FtrlOptimizer":
            f = np.float32
            l1 = self.h("l1_regularization_strength", 0.0)
            l2_32 = f(self.kw.get("l2_regularization_strength", 0.0)) + f(
                self.kw.get("beta", 0.0)
            ) / (f(2) * max(f(lr), f(1e-36)))
            l2 = dt(l2_32)
            shrink = self.kw.get("l2_shrinkage_regularization_strength", 0.0)
            power = self.h("learning_rate_power", -0.5)
            gs = g + dt(2) * hyper(shrink, dt) * var if shrink > 0 else g

            def pw(x):
                return np.sqrt(x) if power == dt(-0.5) else np.power(x, -power)

            new_accum = self.accum + g * g
            self.linear = self.linear + (gs - (pw(new_accum) - pw(self.accum)) / lr_t * var)
            self.l1_margin = min(
                getattr(self, "l1_margin", np.inf), np.abs(np.abs(self.linear) - l1).min()
            )
            x = l1 * np.sign(self.linear) - self.linear
            y = pw(new_accum) / lr_t + dt(2) * l2
            with np.errstate(divide="ignore", invalid="ignore"):
                var = np.where(np.abs(self.linear) > l1, x / y, dt(0))
            self.accum = new_accum
            return var.astype(dt)
        raise ValueError(self.name)

    def slots(self) -> dict[str, np.ndarray]:
        names = {
            "MomentumOptimizer": {"momentum": "accum"},
            "AdamOptimizer": {"m": "m", "v": "v"},
            "RMSPropOptimizer": {"rms": "rms", "momentum": "mom"}
            | ({"mg": "mg"} if self.kw.get("centered", False) else {}),
            "AdagradOptimizer": {"accumulator": "accum"},
            "AdadeltaOptimizer": {"accum": "accum", "accum_update": "accum_update"},
            "FtrlOptimizer": {"accum": "accum", "linear": "linear"},
        }.get(self.name, {})
        return {slot: getattr(self, attr) for slot, attr in names.items()}
