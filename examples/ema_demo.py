"""Shadow weights at work: a noisy regression trained with SGD, evaluated with its EMA.

Run: python examples/ema_demo.py
"""

import torch
from torch import nn

import polyak


def main() -> None:
    torch.manual_seed(0)
    true_w = torch.randn(16, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    polyak.flatten_parameters_(model)  # one buffer: each EMA step is one kernel
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = polyak.GlobalStep()  # TF's global_step: the EMA reads it at every update
    ema = polyak.ExponentialMovingAverage(decay=0.99, num_updates=step)
    ema.apply(model)
    x_test = torch.randn(2048, 16)
    y_test = x_test @ true_w

    def test_loss(m: nn.Module) -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(m(x_test), y_test).item()

    for i in range(1, 2001):
        x = torch.randn(32, 16)
        y = x @ true_w + 0.5 * torch.randn(32, 1)  # noisy labels: SGD's weights jitter
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
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
