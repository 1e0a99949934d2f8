"""polyak.optim against trajectories recorded from TensorFlow 2.21's tf.compat.v1.train optimizers.

The data (tests/data/tf1_optimizers.npz) and the replay come from
tools/tf1_optimizer_reference.py: 100 steps of 31 cases on dense and sparse variables, constant
and per-step learning rates, a variable that skips every third step. TensorFlow itself is not
needed here.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

# Expected bits (run again with AVX-512 off); the CPU update goes through NumPy with one torch
# thread (and foreach with more): test that.
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "tf1_optimizer_reference", ROOT / "tools" / "tf1_optimizer_reference.py"
)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

CASES, DATA = ref.load()
BY_NAME = {case["name"]: case for case in CASES}

# TF's CPU kernels use Eigen's vectorized rsqrt (a hardware estimate plus one Newton step) in
# Adagrad and Adadelta, and Eigen's pow in Ftrl with a power other than -0.5: a few ulps per
# step away from the correctly rounded values polyak computes, and machine-dependent. Every
# other case is bit-identical to TF over all 100 steps.
APPROXIMATE = {name for name in BY_NAME if name.startswith(("adagrad", "adadelta"))}
APPROXIMATE |= {"ftrl-power-0.7"}
# Variables whose kernels TF runs element by element (too short for a vector register, or
# one number per row in the sparse kernels): exact even in the approximate cases.
SCALAR_CODE = ("b", "emb", "vec")


def test_the_data_covers_every_optimizer_and_variant():
    assert ref.load()[1]["meta"] is not None
    optimizers = {case["optimizer"] for case in CASES}
    assert optimizers == {
        "GradientDescentOptimizer",
        "MomentumOptimizer",
        "AdamOptimizer",
        "RMSPropOptimizer",
        "AdagradOptimizer",
        "AdadeltaOptimizer",
        "FtrlOptimizer",
    }
    kwargs = [case["kwargs"] for case in CASES]
    for flag in ("use_nesterov", "centered", "l2_shrinkage_regularization_strength", "beta"):
        assert any(flag in k for k in kwargs)
    assert any(case["decay"] for case in CASES)


@pytest.mark.parametrize("name", sorted(set(BY_NAME) - APPROXIMATE))
def test_bit_identical_to_tensorflow(name):
    case = BY_NAME[name]
    snaps, slots = ref.replay(case, DATA)
    for key, ours in {**snaps, **slots}.items():
        theirs = DATA[f"{name}/{key}"]
        assert ref.ulps(ours, theirs).max() == 0, key


@pytest.mark.parametrize("name", sorted(APPROXIMATE))
def test_within_eigens_rsqrt_and_pow_of_tensorflow(name):
    snaps, slots = ref.replay(BY_NAME[name], DATA)
    for key, ours in snaps.items():
        theirs = DATA[f"{name}/{key}"]
        variable = key.split("/")[1]
        if variable in SCALAR_CODE and not name.startswith("ftrl"):
            assert ref.ulps(ours, theirs).max() == 0, key
            continue
        # The gap, relative to how far TF moved the variable, stays at float32 rounding level
        # (its ulp count can be large where an update nearly cancels the value).
        moved = np.abs(theirs - DATA[f"init/{variable}"]).max()
        assert np.abs(ours - theirs).max() <= 1e-4 * moved, key
    for key, ours in slots.items():
        theirs = DATA[f"{name}/{key}"]
        assert np.allclose(ours, theirs, rtol=1e-4, atol=1e-7), key


@pytest.mark.parametrize("name", ["adam", "rmsprop-centered-momentum-decay", "ftrl", "momentum"])
def test_flattened_parameters_take_the_same_steps(name):
    case = BY_NAME[name]
    plain, plain_slots = ref.replay(case, DATA)
    flat, flat_slots = ref.replay(case, DATA, flat=True)
    for key in plain:
        np.testing.assert_array_equal(plain[key], flat[key])
    for key in plain_slots:
        np.testing.assert_array_equal(plain_slots[key], flat_slots[key])


def test_the_ulp_distance_is_symmetric_across_zero():
    f = np.float32
    a = np.array([0.0, -0.0, 1.0, np.nan, -1.0], f)
    b = np.array([-0.0, np.nextafter(f(0), f(1)), np.nextafter(f(1), f(2)), np.nan, -1.0], f)
    assert ref.ulps(a, b).tolist() == [0, 1, 1, 0, 0]
