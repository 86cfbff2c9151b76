"""Shared test utilities: counting leaves and jitted applies shared across tests."""

import functools
import json
import pathlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import nets


# The reference figures the tests check against, kept in the repository; tests/reference/README.md
# names where each file's numbers come from.
REFERENCE_DIR = pathlib.Path(__file__).resolve().parent / "reference"

# The suite compiles far more than it runs: at LLVM optimisation level 1 XLA:CPU compiles ~30%
# faster than at its default, and the tests' train steps run as fast (BENCHMARKS.md, "Test
# suite"). conftest.py sets it for the test processes, tests/test_train.py's `environment` for
# the programs they start.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"


@functools.cache
def reference_figures(filename: str):
    """The parsed tests/reference/<filename> (params.json, nfnet_official.json, ...)."""
    return json.loads((REFERENCE_DIR / filename).read_text())


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@functools.cache
def jitted_apply(name: str, num_classes: int = 1000, features: bool = False, **overrides):
    """One compiled apply per (model, options), shared by every test that needs it."""
    if features:
        f = nets.transformed_features(name, **overrides)
    else:
        f = nets.transformed(name, num_classes, **overrides)
    return jax.jit(f.apply, static_argnames="is_training")


@functools.cache
def jitted_logits_and_features(name: str, num_classes: int = 1000, **overrides):
    """One compiled eval-mode apply giving (logits, stage maps) of one model: `__call__` and
    `features` (`nets.transformed_features`'s maps) on the same module, whose shared stages XLA
    computes once; `apply(params, state, rng, images) -> ((logits, maps), state)`."""

    def forward(images):
        model = nets.create(name, num_classes, **overrides)
        return model(images, is_training=False), model.features(images, is_training=False)

    return jax.jit(hk.transform_with_state(forward).apply)


def random_images(batch=2, size=64, channels=3, seed=0):
    return np.random.RandomState(seed).randn(batch, size, size, channels).astype(np.float32)


def random_variables(f, example, seed=1):
    """Random (params, state) of the shapes `f.init` gives, without compiling `f.init` (XLA:CPU
    compiles random initialisers far more slowly than the forward): fan-in scaled weights, BN
    scales, offsets and running statistics away from the identity, so eval-mode BN acts."""
    shapes = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True), example)
    return random_values(shapes, seed)


def random_values(shapes, seed=1):
    """`random_variables` for a (params, state) tree of shapes already at hand."""
    rng = np.random.RandomState(seed)

    def draw(path, s):
        leaf = path[-1].key
        if leaf == "w":
            return rng.randn(*s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        if leaf in ("scale", "var", "fusion_weights"):  # fusion: ReLU'd, so kept positive
            return rng.rand(*s.shape) * 0.5 + 0.5
        return rng.randn(*s.shape) * 0.2  # offsets, biases, running means

    return jax.tree.map(lambda v: np.asarray(v, np.float32),
                        jax.tree_util.tree_map_with_path(draw, shapes))


def assert_registry_figures_are_the_tables(name, reference_counts):
    """The registry's figures are tests/reference/params.json's row of its reference."""
    info = nets.model_info(name)
    row = reference_counts[tuple(info.reference.split(":"))]
    assert (info.reference_params, info.reference_params_no_head,
            info.reference_bn_stat_elems) == (row["params_with_head"], row["params_no_head"],
                                              row["bn_stat_elems"])


def random_train_state(model, optimizer, size: int, *, ema: bool, seed=1):
    """A replicated TrainState of `random_variables` (nothing compiled) for size x size images,
    with the optimizer's initial state and, with `ema`, an EMA equal to the variables."""
    from training import distributed
    from training.state import TrainState

    params, model_state = random_variables(model, jnp.zeros((1, size, size, 3)), seed=seed)
    state = TrainState(jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(0)), params,
                       model_state, optimizer.init(params), params if ema else None,
                       model_state if ema else None)
    return jax.device_put(state, distributed.replicated(distributed.data_mesh()))
