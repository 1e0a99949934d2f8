"""Reference trajectories of TensorFlow 1.x's optimizers, and polyak.optim's distance to them.

    python tools/tf1_optimizer_reference.py generate   # needs tensorflow (not a dependency)
    python tools/tf1_optimizer_reference.py compare    # needs polyak; prints the ulp table

``generate`` runs every case of :data:`CASES` in ``tf.compat.v1`` graph mode (reference
variables, ``tf.compat.v1.train.*Optimizer.apply_gradients``) on fixed float32 inputs and
writes ``tests/data/tf1_optimizers.npz``: the inputs, each case's variables after the steps
in :data:`SNAPSHOTS`, its slots after the last step, and the TF version. The problem: three
dense variables (``w`` 5x7, ``b`` 3, ``big`` 64; ``b`` gets no gradient every third step,
so Adam's shared beta powers advance without it) and two with sparse gradients
(``IndexedSlices`` with duplicate indices: ``emb`` 10x4 and the one-number-per-row ``vec`` 12),
all in one optimizer; gradients of varied scale (1e-4 to 3) with some exact zeros;
constant learning rates and ones fed per step (``decay``: ``lr * 0.97**t``).

``compare`` replays the cases with polyak.optim (:func:`replay`, also used by
tests/test_optim_tf_reference.py) and prints, per case, the largest distance in float32 ulps
at the first step, over all variables and snapshots, and of the slots at the end, and the
largest gap relative to the distance TF moved the variable (ulps overstate a gap where an
update nearly cancels the value).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "tf1_optimizers.npz"
STEPS = 100
SNAPSHOTS = (1, 2, 3, 5, 10, 20, 50, 100)
DENSE = {"w": (5, 7), "b": (3,), "big": (64,)}
SPARSE = {"emb": (10, 4), "vec": (12,)}
NNZ = 6  # sparse entries per step (with duplicates)
SKIPPED = "b"  # no gradient at steps t % 3 == 2

# name, TF optimizer class, keyword arguments (TF's names), learning-rate schedule
CASES: list[dict] = []


def _case(name: str, optimizer: str, decay: bool = False, **kwargs: float) -> None:
    CASES.append({"name": name, "optimizer": optimizer, "kwargs": kwargs, "decay": decay})


for _decay in (False, True):
    _s = "-decay" if _decay else ""
    _case("sgd" + _s, "GradientDescentOptimizer", _decay, learning_rate=0.1)
    _case("momentum" + _s, "MomentumOptimizer", _decay, learning_rate=0.1, momentum=0.9)
    _case(
        "nesterov" + _s,
        "MomentumOptimizer",
        _decay,
        learning_rate=0.1,
        momentum=0.9,
        use_nesterov=True,
    )
    _case("adam" + _s, "AdamOptimizer", _decay, learning_rate=0.01)
    _case("rmsprop" + _s, "RMSPropOptimizer", _decay, learning_rate=0.01)
    _case(
        "rmsprop-centered-momentum" + _s,
        "RMSPropOptimizer",
        _decay,
        learning_rate=0.01,
        momentum=0.9,
        centered=True,
    )
    _case("adagrad" + _s, "AdagradOptimizer", _decay, learning_rate=0.1)
    _case("adadelta" + _s, "AdadeltaOptimizer", _decay, learning_rate=1.0)
    _case("ftrl" + _s, "FtrlOptimizer", _decay, learning_rate=0.1)
    _case(
        "ftrl-l1-l2-shrinkage-beta" + _s,
        "FtrlOptimizer",
        _decay,
        learning_rate=0.1,
        l1_regularization_strength=0.01,
        l2_regularization_strength=0.01,
        l2_shrinkage_regularization_strength=0.1,
        beta=0.5,
    )
_case("adam-default", "AdamOptimizer")
_case("adam-epsilon-1", "AdamOptimizer", learning_rate=0.1, epsilon=1.0)
_case("adam-beta-0.5-0.9", "AdamOptimizer", learning_rate=0.01, beta1=0.5, beta2=0.9)
_case("rmsprop-momentum", "RMSPropOptimizer", learning_rate=0.01, momentum=0.9)
_case("rmsprop-centered", "RMSPropOptimizer", learning_rate=0.01, centered=True)
_case("rmsprop-epsilon-1e-3", "RMSPropOptimizer", learning_rate=0.01, decay=0.5, epsilon=1e-3)
_case("adagrad-init-1", "AdagradOptimizer", learning_rate=0.5, initial_accumulator_value=1.0)
_case("adadelta-rho-0.5", "AdadeltaOptimizer", learning_rate=0.5, rho=0.5, epsilon=1e-6)
_case("ftrl-power-0.7", "FtrlOptimizer", learning_rate=0.1, learning_rate_power=-0.7)
_case(
    "ftrl-l1-l2",
    "FtrlOptimizer",
    learning_rate=0.1,
    l1_regularization_strength=0.05,
    l2_regularization_strength=0.01,
)
_case("ftrl-zero-accumulator", "FtrlOptimizer", learning_rate=0.1, initial_accumulator_value=0.0)


def learning_rate(case: dict, t: int) -> float:
    """The learning rate of step ``t`` (0-based), as float32."""
    lr = case["kwargs"].get("learning_rate", 0.001)
    return float(np.float32(lr * 0.97**t if case["decay"] else lr))


def make_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.array([1.0, 0.01, 3.0, 1e-4, 0.3], np.float32)

    def grads(shape: tuple[int, ...]) -> np.ndarray:
        g = rng.standard_normal((STEPS, *shape)).astype(np.float32)
        g *= scales[np.arange(STEPS) % len(scales)].reshape((STEPS,) + (1,) * len(shape))
        g[rng.random(g.shape) < 0.1] = 0.0
        return g

    out: dict[str, np.ndarray] = {}
    for name, shape in {**DENSE, **SPARSE}.items():
        out[f"init/{name}"] = rng.standard_normal(shape).astype(np.float32)
    for name, shape in DENSE.items():
        out[f"grad/{name}"] = grads(shape)
    for name, shape in SPARSE.items():
        out[f"indices/{name}"] = rng.integers(0, shape[0], (STEPS, NNZ)).astype(np.int64)
        out[f"values/{name}"] = grads((NNZ, *shape[1:]))
    return out


# ---------------------------------------------------------------------- TensorFlow side


def generate(path: Path) -> None:
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    inputs = make_inputs()
    out = dict(inputs)
    for case in CASES:
        snaps, slots = _run_tf(tf, case, inputs)
        for key, value in {**snaps, **slots}.items():
            out[f"{case['name']}/{key}"] = value
    out["cases"] = np.array(json.dumps(CASES))
    out["meta"] = np.array(
        json.dumps({"tensorflow": tf.__version__, "steps": STEPS, "snapshots": SNAPSHOTS})
    )
    np.savez_compressed(path, **out)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(CASES)} cases, TF {tf.__version__})")


def _run_tf(tf, case: dict, inputs: dict) -> tuple[dict, dict]:
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        variables = {
            name: v1.Variable(inputs[f"init/{name}"], name=name, use_resource=False)
            for name in {**DENSE, **SPARSE}
        }
        feeds = {name: v1.placeholder(tf.float32, shape) for name, shape in DENSE.items()}
        sparse_feeds = {
            name: (
                v1.placeholder(tf.float32, (None, *shape[1:])),
                v1.placeholder(tf.int64, (None,)),
            )
            for name, shape in SPARSE.items()
        }
        kwargs = dict(case["kwargs"])
        lr_feed = None
        if case["decay"]:
            lr_feed = v1.placeholder(tf.float32, ())
            kwargs["learning_rate"] = lr_feed
        opt = getattr(v1.train, case["optimizer"])(**kwargs)
        pairs = [(feeds[n], variables[n]) for n in DENSE]
        pairs += [
            (tf.IndexedSlices(values, indices, tf.constant(SPARSE[n], tf.int64)), variables[n])
            for n, (values, indices) in sparse_feeds.items()
        ]
        train_all = opt.apply_gradients(pairs)
        train_some = opt.apply_gradients([p for p in pairs if p[1] is not variables[SKIPPED]])
        slot_names = sorted(opt.get_slot_names())
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            snaps: dict[str, np.ndarray] = {}
            for t in range(STEPS):
                feed = {feeds[n]: inputs[f"grad/{n}"][t] for n in DENSE}
                for n, (values, indices) in sparse_feeds.items():
                    feed[values] = inputs[f"values/{n}"][t]
                    feed[indices] = inputs[f"indices/{n}"][t]
                if lr_feed is not None:
                    feed[lr_feed] = np.float32(learning_rate(case, t))
                sess.run(train_some if t % 3 == 2 else train_all, feed)
                if t + 1 in SNAPSHOTS:
                    for n, var in variables.items():
                        snaps.setdefault(f"var/{n}", []).append(sess.run(var))
            slots = {
                f"slot/{s}/{n}": sess.run(opt.get_slot(var, s))
                for s in slot_names
                for n, var in variables.items()
            }
    return {k: np.stack(v) for k, v in snaps.items()}, slots


# ---------------------------------------------------------------------- polyak side


def load(path: Path = DATA) -> tuple[list[dict], dict[str, np.ndarray]]:
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    return json.loads(str(data["cases"])), data


def replay(case: dict, data: dict, *, flat: bool = False) -> tuple[dict, dict]:
    """``(snapshots, slots)`` of ``case`` run by polyak.optim, keyed as in the data file.
    ``flat=True`` puts the dense variables in one buffer first (``flatten_parameters_``)."""
    import torch

    import polyak
    import polyak.optim
    from polyak.flat import pack

    params = {
        name: torch.nn.Parameter(torch.from_numpy(data[f"init/{name}"].copy()))
        for name in {**DENSE, **SPARSE}
    }
    grad_slots = {}
    if flat:  # weights, gradients (and so slots) in one buffer each
        holder = torch.nn.Module()
        for name in DENSE:
            holder.register_parameter(name, params[name])
        polyak.flatten_parameters_(holder, grads=False)
        views = pack([(p.shape, p.dtype, p.device) for p in holder.parameters()])
        grad_slots = dict(zip(DENSE, views))
    kwargs = dict(case["kwargs"])
    kwargs.setdefault("learning_rate", learning_rate(case, 0))
    opt = getattr(polyak.optim, case["optimizer"])(list(params.values()), **kwargs)
    snaps: dict[str, list[np.ndarray]] = {}
    for t in range(STEPS):
        for name in DENSE:
            skip = name == SKIPPED and t % 3 == 2
            grad = None if skip else torch.from_numpy(data[f"grad/{name}"][t])
            if grad is not None and name in grad_slots:
                grad = grad_slots[name].copy_(grad)
            params[name].grad = grad
        for name, shape in SPARSE.items():
            indices = torch.from_numpy(data[f"indices/{name}"][t])[None]
            values = torch.from_numpy(data[f"values/{name}"][t])
            params[name].grad = torch.sparse_coo_tensor(
                indices, values, shape, check_invariants=True
            )
        opt.param_groups[0]["lr"] = learning_rate(case, t)
        opt.step()
        if t + 1 in SNAPSHOTS:
            for name, p in params.items():
                snaps.setdefault(f"var/{name}", []).append(p.detach().numpy().copy())
    slots = {
        f"slot/{slot}/{name}": value.numpy().copy()
        for name, p in params.items()
        for slot, value in opt.state[p].items()
    }
    return {k: np.stack(v) for k, v in snaps.items()}, slots


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance between float32 arrays in units in the last place (NaN vs NaN: 0)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)

    def ordered(x: np.ndarray) -> np.ndarray:
        i = x.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    d = np.abs(ordered(a) - ordered(b))
    return np.where(np.isnan(a) & np.isnan(b), 0, d)


def distances(case: dict, data: dict, **kwargs: bool) -> dict[str, int]:
    """Largest ulp distance between polyak's and TF's values of ``case``: over all variables
    and snapshots (``all``), at the first step (``first``), and of the slots at the end."""
    snaps, slots = replay(case, data, **kwargs)
    name = case["name"]
    first = max(int(ulps(v[0], data[f"{name}/{k}"][0]).max()) for k, v in snaps.items())
    every = max(int(ulps(v, data[f"{name}/{k}"]).max()) for k, v in snaps.items())
    slot = max((int(ulps(v, data[f"{name}/{k}"]).max()) for k, v in slots.items()), default=0)
    relative = max(
        float(np.abs(v - data[f"{name}/{k}"]).max())
        / float(np.abs(data[f"{name}/{k}"] - data[f"init/{k.split('/')[1]}"]).max())
        for k, v in snaps.items()
    )
    return {"first": first, "all": every, "slots": slot, "relative": relative}


def compare(path: Path, out: Path | None) -> None:
    cases, data = load(path)
    meta = json.loads(str(data["meta"]))
    print(f"TensorFlow {meta['tensorflow']}, {meta['steps']} steps, snapshots {meta['snapshots']}")
    print(
        "| case | max ulp, step 1 | max ulp, all snapshots | max ulp, slots at the end "
        "| largest gap / distance moved |"
    )
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for case in cases:
        d = rows[case["name"]] = distances(case, data)
        print(
            f"| {case['name']} | {d['first']} | {d['all']} | {d['slots']} | {d['relative']:.1e} |"
        )
    if out is not None:
        out.write_text(
            json.dumps({"tensorflow": meta["tensorflow"], "cases": rows}, indent=1) + "\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["generate", "compare"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None, help="compare: write a JSON summary")
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.data)
    else:
        sys.path.insert(0, str(ROOT / "src"))
        compare(args.data, args.out)


if __name__ == "__main__":
    main()
