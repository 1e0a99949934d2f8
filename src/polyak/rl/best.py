"""The best policy of a run (``keep_best``): validation-based selection of the delivered policy.

With ``keep_best`` on, every evaluation during training (every ``eval_every`` steps, and the
last weights' evaluation at ``total_steps``) is a *validation*: on episodes seeded
``seed + 1000000 + k``, it offers the policy network (``Agent.policy_network()``: what greedy
actions use) to :class:`BestPolicy`, which keeps a copy of the one with the highest mean return,
ties going to the latest. The run delivers that copy (``policy.pt``), and its final evaluation
runs on *other* episodes, seeded ``seed + 2000000 + k``, so the reported return is not the one
the choice was made on: validation picks, test reports. The last weights are evaluated on the
same test episodes (``last_eval_return`` in ``summary.json``), so a run shows what the choice
changed.

This is Keras's ``EarlyStopping(restore_best_weights=True)`` without the early stop, and
Stable-Baselines3's ``EvalCallback(best_model_save_path=...)`` (which rl-baselines3-zoo's
training script installs by default) with a held-out final evaluation. Training never reads it:
the run's networks, optimizers and targets are the same with and without it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["BestPolicy"]


class BestPolicy:
    """Copy of the policy network with the highest validation return so far (ties: latest)."""

    def __init__(self) -> None:
        self.step = 0
        self.validation_return = -math.inf
        self.policy: dict[str, torch.Tensor] | None = None

    def offer(self, step: int, validation_return: float, network: nn.Module) -> bool:
        """Keep ``network``'s weights if ``validation_return`` >= the best so far; True if kept.

        Ties go to the later network: a run that reaches the top score and stays there
        delivers its last weights, as a run without ``keep_best`` does.
        """
        if self.policy is not None and not (
            validation_return >= self.validation_return or math.isnan(self.validation_return)
        ):
            return False  # worse, or NaN: a NaN is kept only until a number comes
        self.step, self.validation_return = step, validation_return
        # On the CPU, whatever the network's device: policy.pt and the checkpoint then read on
        # any machine, and are the same bytes whether the copy was made here or restored.
        self.policy = {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}
        return True

    def state_dict(self) -> dict[str, Any]:
        """``step``, ``validation_return`` and ``policy`` (the copied state dict, or None)."""
        return {
            "step": self.step,
            "validation_return": self.validation_return,
            "policy": self.policy,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from a checkpoint's ``"best"`` entry)."""
        self.step = state["step"]
        self.validation_return = state["validation_return"]
        self.policy = state["policy"]
