"""Fast paths of the agents: the plain torch computation, with less overhead around it.

An agent reads as its algorithm and calls these where the plain form is slow; each is tested
against the plain form:

- :class:`GreedyActions`: ``argmax_a Q(s, a)`` for one observation. On float32 weights in host
  memory it runs the MLP in NumPy on views of the live parameters: acting on one observation is
  most of an environment step's cost, and torch's per-operator dispatch costs more than the
  matrix-vector products of a small network. The action is torch's argmax wherever the best
  two Q-values are not tied to within float rounding (a different matmul may round otherwise).
- :func:`train_burst_fixed_targets`: ``n`` gradient steps whose TD targets do not depend on the
  steps themselves (a frozen target network, a target that does not read the online network),
  with all targets computed at once, in row pieces that stay in the CPU's caches: the same
  bits as ``n`` plain steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from polyak.rl.networks import QNetwork
from polyak.rl.replay import Batch, minibatch

__all__ = ["CPU_TARGET_ROWS", "GreedyActions", "fixed_targets", "train_burst_fixed_targets"]

# Rows per forward pass of a batched target on CPU: a piece's activations stay in the caches,
# where a whole burst's (several MB) miss them and are page-faulted in as fresh allocations
# (docs/performance.md). Each row is computed by the same arithmetic either way.
CPU_TARGET_ROWS = 512

_HostLayers = list[tuple[np.ndarray, np.ndarray]]


class GreedyActions:
    """``argmax_a Q(s, a)`` for one observation, for any :class:`QNetwork` given at the call.

    ``device`` and ``dtype`` are the networks'; on float32 CPU weights the forward pass runs in
    NumPy on views ``(W, b)`` of each network's layers, kept per network and rebuilt whenever a
    parameter's storage changed (``load_state_dict`` writes in place, so the views stay live;
    assigning ``.data`` is caught by the storage check). Elsewhere it is the network's own
    forward under ``torch.inference_mode``.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._on_host = device.type == "cpu" and dtype == torch.float32
        # id(network) -> (data pointers of its weights, their NumPy views)
        self._views: dict[int, tuple[tuple[int, ...], _HostLayers]] = {}

    def __call__(self, q: QNetwork, obs: np.ndarray) -> int:
        layers = self.host_layers(q)
        if layers is None:
            with torch.inference_mode():
                x = torch.as_tensor(obs, dtype=self.dtype, device=self.device).unsqueeze(0)
                return int(q(x).argmax())
        x = np.asarray(obs, dtype=np.float32)
        last = len(layers) - 1
        for i, (w, b) in enumerate(layers):
            x = w @ x + b
            if i < last:
                np.maximum(x, 0.0, out=x)
        return int(x.argmax())

    def host_layers(self, q: QNetwork) -> _HostLayers | None:
        """NumPy views ``(W, b)`` of ``q``'s layers, or ``None`` off float32 host memory."""
        if not self._on_host:
            return None
        # The layers' own tensors, not q.parameters(): walking the module tree costs more than
        # the matrix-vector products it would guard.
        key = tuple(t.data_ptr() for layer in q.layers for t in (layer.weight, layer.bias))
        cached = self._views.get(id(q))
        if cached is None or cached[0] != key:
            views = [
                (layer.weight.detach().numpy(), layer.bias.detach().numpy()) for layer in q.layers
            ]
            cached = self._views[id(q)] = (key, views)
        return cached[1]


def fixed_targets(td_target: Callable[[Batch], torch.Tensor], burst: Batch) -> torch.Tensor:
    """``td_target`` of every row of ``burst`` without autograd, in pieces of
    :data:`CPU_TARGET_ROWS` rows on CPU (one piece elsewhere): ``[rows]``."""
    rows = burst.obs.shape[0]
    piece = CPU_TARGET_ROWS if burst.obs.device.type == "cpu" else rows
    with torch.no_grad():
        return torch.cat([td_target(minibatch(burst, k, piece)) for k in range(-(-rows // piece))])


def train_burst_fixed_targets(
    td_target: Callable[[Batch], torch.Tensor],
    train_step: Callable[[Batch, torch.Tensor], dict[str, torch.Tensor]],
    burst: Batch,
    n: int,
) -> dict[str, torch.Tensor]:
    """``train_step(minibatch_k, y_k)`` for ``k = 0 .. n-1`` with every ``y_k = td_target(
    minibatch_k)`` computed up front by :func:`fixed_targets`; returns the last step's losses.

    Exact only when the targets do not change during the burst: the caller's promise.
    """
    batch_size = burst.obs.shape[0] // n
    targets = fixed_targets(td_target, burst)
    losses: dict[str, torch.Tensor] = {}
    for k in range(n):
        losses = train_step(
            minibatch(burst, k, batch_size), targets[k * batch_size : (k + 1) * batch_size]
        )
    return losses
