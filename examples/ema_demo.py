"""Shadow weights at work: a noisy regression trained with SGD, evaluated with its EMA.

Run: python examples/ema_demo.py
"""

from collections.abc import Callable

import torch
from torch import nn

import polyak


def regression_task(
    seed: int = 0, lr: float = 0.1
) -> tuple[nn.Module, Callable[[], None], Callable[[nn.Module], float]]:
    """A 16-64-1 MLP, its SGD step on a fresh batch with noisy labels (the weights jitter),
    and its test MSE on 2048 clean examples."""
    torch.manual_seed(seed)
    true_w = torch.randn(16, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    polyak.flatten_parameters_(model)  # one buffer: each EMA step is one kernel
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x_test = torch.randn(2048, 16)
    y_test = x_test @ true_w

    def train_step() -> None:
        x = torch.randn(32, 16)
        y = x @ true_w + 0.5 * torch.randn(32, 1)  # noisy labels: SGD's weights jitter
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def test_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(m(x_test), y_test).item()

    return model, train_step, test_loss


def main() -> None:
    model, train_step, test_loss = regression_task()
    step = polyak.GlobalStep()  # TF's global_step: the EMA reads it at every update
    ema = polyak.ExponentialMovingAverage(decay=0.99, num_updates=step)
    ema.apply(model)
    for i in range(1, 2001):
        train_step()
        step.increment()
        ema.update()
        if i % 500 == 0:
            with ema.average_parameters(model):
                averaged = test_loss(model)
            print(
                f"step {i:5d}  decay {float(ema.decay):.4f}  test MSE: raw {test_loss(model):.4f}"
                f"  EMA {averaged:.4f}"
            )
    print(f"{ema!r}: {sum(t.numel() for t in ema.state_dict()['averages'].values())} shadow values")


if __name__ == "__main__":
    main()
