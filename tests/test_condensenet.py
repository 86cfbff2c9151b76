"""CondenseNet: parameter counts against the authors' code and the paper, the condensation
schedule, masks that drop exactly the stated fraction per stage and group, the group lasso, and
the conversion to the inference form (equal eval outputs), and a `:local` training run through
every stage with an exact resume after SIGTERM. A small network (two blocks) for everything that
computes."""

import functools
import json
import os
import pathlib
import signal

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

import data
import nets
from experiments import condensenet as experiment
from nets import condensenet
from tests.helpers import count, random_values
from tests.test_train import saved_tree
from training import condensation, loop

NAME = "condensenet86_cifar"
TINY = dict(stages=(2, 3), growth_rates=(8, 16))  # C = G = 4; inputs 16..64, all divisible


def _shapes(name, num_classes=None, **overrides):
    """(params, state) shapes of the variant's training-mode init at 32 px."""
    def init(images):
        with nets.registry.zero_init():
            return nets.create(name, num_classes, **overrides)(images, is_training=True)

    return jax.eval_shape(hk.transform_with_state(init).init, jax.random.key(0),
                          nets.introspect.example_images(name, 1, 32, **overrides))


@pytest.fixture
def fast_compiles():
    """XLA's quick compiles: what computes here is a small network on a few images (and the
    runs a few steps of it), all compile time (flax's examples test their loop this way)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def test_the_registered_variants():
    assert nets.list_models("condensenet*") == [
        "condensenet74_c4_g4", "condensenet74_c8_g8", "condensenet86_cifar"]
    for c in (4, 8):
        config = nets.model_info(f"condensenet74_c{c}_g{c}").config
        assert (config["stages"], config["growth_rates"], config["groups_1x1"],
                config["groups_3x3"], config["condense_factor"]) == (
            (4, 6, 8, 10, 8), (8, 16, 32, 64, 128), c, c, c)
    info = nets.model_info(NAME)
    assert (info.config["stages"], info.config["growth_rates"], info.feature_strides,
            nets.default_num_classes(NAME)) == ((14, 14, 14), (8, 16, 32), (1, 2, 4), 10)
    assert 3 * 14 * 2 + 2 == 86  # two convs per dense layer, the stem conv and the classifier


def _hand_count(stages, growth_rates, groups_1x1, groups_3x3, condense_factor, num_classes,
                bottleneck=4, **_):
    """Parameters of the converted network, layer by layer (the paper's accounting): per dense
    layer the BN over the G * I / C gathered inputs, the grouped 1x1 conv, the BN and the 3x3
    group conv; the stem conv, the final BN and the classifier on half the features."""
    c = 2 * growth_rates[0]
    total = 3 * 3 * 3 * c
    for n, k in zip(stages, growth_rates):
        for _ in range(n):
            width = bottleneck * k
            total += 2 * groups_1x1 * c // condense_factor + (c // condense_factor) * width
            total += 2 * width + 9 * (width // groups_3x3) * k
            c += k
    return total + 2 * c + (c // 2) * num_classes + num_classes


# The authors' code (ShichenLiu/CondenseNet, models/condensenet.py and condensenet_converted.py,
# built with the registered arguments and counted with PyTorch): parameters of the training and
# of the converted network, with the default head (1000 classes; CIFAR-10's 10).
AUTHORS = {"condensenet74_c4_g4": (11922680, 4773944), "condensenet74_c8_g8": (11103608, 2935416),
           "condensenet86_cifar": (1451594, 516202)}
PAPER = {"condensenet74_c4_g4": 4.8e6, "condensenet74_c8_g8": 2.9e6, "condensenet86_cifar": 0.52e6}


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_counts_equal_the_authors_code_and_the_paper(name):
    """The inference form: the hand count, the authors' converted network, and the paper's
    figure (ImageNet 4.8M / 2.9M, CIFAR-10 0.52M) to its rounding; the training form: the
    authors' training network (every 1x1 conv dense, its mask in the state)."""
    training, converted = AUTHORS[name]
    params, state = _shapes(name)
    info = nets.model_info(name)
    hand = _hand_count(**{"groups_1x1": 4, "groups_3x3": 4, "condense_factor": 4, **info.config},
                       num_classes=nets.default_num_classes(name))
    assert count(params) == hand == converted
    digits = 2 if name.endswith("cifar") else 1
    assert round(converted / 1e6, digits) == PAPER[name] / 1e6
    assert not condensenet.learned_convs(state)
    train_params, train_state = _shapes(name, condensed=False)
    assert count(train_params) == training
    masks = condensenet.learned_convs(train_state)
    assert len(masks) == sum(info.config["stages"])
    groups = info.config.get("groups_1x1", 4)
    assert all(train_state[m]["mask"].shape == (train_params[m]["w"].shape[2], groups)
               for m in masks)


def test_the_schedule_condenses_at_the_authors_progress_points():
    """Stage s from progress s / (2 (C - 1)) on (LearnedGroupConv._check_drop, evaluated in
    exact fractions), the last stage C - 1 from half of training on."""
    from fractions import Fraction

    def authors(step, total, c):
        for i in range(c - 1):
            if 2 * Fraction(step, total) < Fraction(i + 1, c - 1):
                return i
        return c - 1

    for c, total in ((4, 100), (8, 1000), (4, 7), (8, 5), (1, 10)):
        steps = np.arange(total + 1)
        ours = np.asarray(condensenet.condensation_stage(jnp.asarray(steps), total, c))
        assert ours.tolist() == [authors(s, total, c) for s in steps]
    assert condensenet.condensation_stage(50, 100, 4) == 3
    with pytest.raises(ValueError, match="total_steps"):
        condensenet.condensation_stage(0, 0, 4)


def _synthetic(c_in=16, out=12, groups=4, seed=0):
    rng = np.random.RandomState(seed)
    module = "net/block/layer/conv1"
    params = {module: {"w": rng.randn(1, 1, c_in, out).astype(np.float32)}}
    return module, params, {module: {"mask": np.ones((c_in, groups), np.float32)}}


def test_condense_drops_exactly_the_least_important_fraction_per_group():
    """Each stage drops, in every group, exactly I / C more inputs: those of smallest L1 norm of
    the group's (masked) weights, computed here from the definition; stages are idempotent, never
    undone, and a jump of several stages drops what one stage at a time would."""
    c_in, out, groups, factor = 16, 12, 4, 4
    module, params, state = _synthetic(c_in, out, groups)
    w = params[module]["w"][0, 0]
    kept = [set(range(c_in)) for _ in range(groups)]
    for stage in range(1, factor):
        state = condensenet.condense(params, state, stage, condense_factor=factor)
        mask = np.asarray(state[module]["mask"])
        for g in range(groups):
            outputs = [o for o in range(out) if o % groups == g]  # the authors' interleaving
            alive = sorted(kept[g], key=lambda i: (np.abs(w[i, outputs]).sum(), i))
            kept[g] -= set(alive[:c_in // factor])
            assert set(np.flatnonzero(mask[:, g])) == kept[g]
            assert mask[:, g].sum() == c_in - stage * c_in // factor
        again = condensenet.condense(params, state, stage, condense_factor=factor)
        np.testing.assert_array_equal(again[module]["mask"], mask)
        earlier = condensenet.condense(params, state, stage - 1, condense_factor=factor)
        np.testing.assert_array_equal(earlier[module]["mask"], mask)
    _, _, fresh = _synthetic(c_in, out, groups)
    jumped = jax.jit(functools.partial(condensenet.condense, condense_factor=factor))(
        params, fresh, factor - 1)
    np.testing.assert_array_equal(jumped[module]["mask"], state[module]["mask"])
    assert (np.asarray(state[module]["mask"]).sum(0) == c_in // factor).all()


def test_group_lasso_is_the_authors_penalty():
    module, params, state = _synthetic(seed=1)
    state = condensenet.condense(params, state, 1, condense_factor=4)
    w = params[module]["w"][0, 0]
    mask = np.asarray(state[module]["mask"])
    expected = 0.0
    for g in range(4):
        for i in range(16):
            squares = sum((w[i, o] * mask[i, g]) ** 2 for o in range(g, 12, 4))
            expected += np.sqrt(max(squares, condensenet.LASSO_MIN))
    np.testing.assert_allclose(condensenet.group_lasso(params, state), expected, rtol=1e-5)
    assert np.isfinite(jax.grad(lambda p: condensenet.group_lasso(p, state))(params)[module]["w"]
                       ).all()


# ----------------------------------------------------------------------------------------------
# The training form and its conversion, on a small network


@functools.cache
def _trained_like():
    """Random variables of the small training form (BatchNorm statistics away from identity),
    condensed through every stage, and a batch of images."""
    f = nets.transformed(NAME, 10, condensed=False, **TINY)
    images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    params, state = random_values(jax.eval_shape(
        lambda x: f.init(jax.random.key(0), x, is_training=True), images))
    state = {m: {k: np.ones_like(v) if k == "mask" else v for k, v in leaves.items()}
             for m, leaves in state.items()}
    state = condensenet.condense(params, state, 3, condense_factor=4)
    return f, params, state, images


def test_masks_are_state_and_stop_the_gradient_of_dropped_weights(fast_compiles):
    f, params, state, images = _trained_like()
    convs = condensenet.learned_convs(state)
    assert convs and all(set(params[m]) == {"w"} for m in convs)

    def loss(p):
        logits, new_state = f.apply(p, state, jax.random.key(0), images, is_training=True)
        return jnp.sum(logits ** 2), new_state

    grads, new_state = jax.jit(jax.grad(loss, has_aux=True))(params)
    for m in convs:
        mask = np.asarray(state[m]["mask"])
        np.testing.assert_array_equal(new_state[m]["mask"], mask)  # training leaves it alone
        g = np.abs(np.asarray(grads[m]["w"][0, 0]).reshape(mask.shape[0], -1, mask.shape[1]))
        assert (g * (1 - mask)[:, None, :]).max() == 0 and (g * mask[:, None, :]).max() > 0


@pytest.mark.parametrize("keep", [1.0, condensenet.CLASSIFIER_KEEP])
def test_the_converted_model_computes_the_masked_models_eval_outputs(keep, fast_compiles):
    """The inference form on the converted variables gives the training form's eval logits
    (< 1e-5), the classifier reading the kept features (keep=0.5: the training form with the
    dropped features' classifier rows zeroed, which is what the authors' pruning computes); its
    trees are exactly what the inference form builds, and its features are the same maps."""
    f, params, state, images = _trained_like()
    conv_params, conv_state, selection = condensenet.convert(params, state, keep)
    g = nets.transformed(NAME, 10, selection=selection, **TINY)
    expected = jax.eval_shape(lambda x: g.init(jax.random.key(0), x, is_training=True), images)
    assert jax.tree.map(np.shape, (conv_params, conv_state)) == jax.tree.map(
        lambda s: s.shape, expected)
    head = nets.head_module(NAME)
    kept = dict(selection)["classifier"]
    assert len(kept) == int(params[head]["w"].shape[0] * keep)
    rows = np.isin(np.arange(params[head]["w"].shape[0]), kept)[:, None]
    pruned = {**params, head: {**params[head], "w": np.where(rows, params[head]["w"], 0.0)}}
    logits, _ = jax.jit(f.apply, static_argnames="is_training")(pruned, state, None, images,
                                                                is_training=False)
    ours, _ = jax.jit(g.apply, static_argnames="is_training")(conv_params, conv_state, None,
                                                              images, is_training=False)
    assert np.abs(logits).max() > 0.1
    np.testing.assert_allclose(ours, logits, atol=1e-5, rtol=0)
    assert count(conv_params) < count(params)


def test_bad_input_is_a_clear_error():
    def build(**overrides):
        f = nets.transformed(NAME, 10, **overrides)
        jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=False),
                       jnp.zeros((1, 8, 8, 3)))

    with pytest.raises(ValueError, match="selection describes the condensed"):
        build(condensed=False, selection=(("classifier", (0,)),))
    with pytest.raises(ValueError, match="stages"):
        build(stages=(14, 14), growth_rates=(8, 16, 32))
    with pytest.raises(ValueError, match="condense_factor"):
        build(condense_factor=0)
    with pytest.raises(ValueError, match="do not divide"):
        build(stages=(1,), growth_rates=(5,))  # 10 inputs, G = C = 4
    with pytest.raises(ValueError, match="output channels do not divide"):
        build(stages=(1,), growth_rates=(6,), bottleneck=1, condensed=False)  # 6 outputs, G = 4
    with pytest.raises(ValueError, match="selection must list"):
        build(stages=(1,), growth_rates=(8,),
              selection=(("denseblock1/denselayer1", (0, 1, 2, 16)),))
    _, params, state = _synthetic()
    with pytest.raises(ValueError, match="different numbers"):
        module = next(iter(state))
        uneven = np.eye(16, 4, dtype=np.float32)
        uneven[5, 0] = 1  # group 0 keeps two inputs, the others one
        condensenet.convert(params, {module: {"mask": uneven}})
    with pytest.raises(ValueError, match="no learned group conv"):
        condensenet.convert(params, {})


# ----------------------------------------------------------------------------------------------
# Training: experiments/condensenet.py:local through the real loop (a small network, 16 px)

RUN_STEPS = 12  # C = 4: stage s from step s * 12 / 6 = 2s on (steps counted from 0)
RUN_MODEL = dict(stages=(1, 2), growth_rates=(8, 16))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.prepare_builtin(str(path))
    return path


def _local_config(data_dir):
    c = experiment.get_config("local")
    c.model_kwargs.update(RUN_MODEL)
    c.update(dict(num_steps=RUN_STEPS, batch_size=16, log_every=1, checkpoint_every=100))
    c.data.update(dict(data_dir=str(data_dir), train_size=16, test_size=16))
    return c


def _logged(workdir, key):
    rows = [json.loads(line) for line in
            pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


@pytest.fixture
def compilation_cache(tmp_path):
    """JAX's persistent compilation cache in a fresh directory: the three runs below build the
    same steps, which the second and third then load instead of compiling."""
    options = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {option: getattr(jax.config, option) for option in options}
    jax.config.update(options[0], str(tmp_path / "compilation_cache"))
    jax.config.update(options[1], 0.0)
    jax_cache.reset_cache()   # the cache is set up at the first compile: again, with the dir
    yield
    for option, value in before.items():
        jax.config.update(option, value)
    jax_cache.reset_cache()


def test_a_local_run_condenses_at_every_stage_and_resumes_exactly_after_sigterm(
        digits, tmp_path, monkeypatch, fast_compiles, compilation_cache):
    """The :local experiment (task "condensation") passes through stages 0..3, the group lasso
    stops when condensing ends, and the masks end with exactly I / C inputs per group. A run
    stopped by SIGTERM between stage 1 (step 2) and stage 2 (step 4) and resumed ends with the
    same train state, masks included, as the run never stopped."""
    config = _local_config(digits)
    straight = loop.run(config, str(tmp_path / "straight"))
    assert straight.final_line and not straight.preempted
    stages = _logged(tmp_path / "straight", "train/condensation_stage")
    assert stages == [min(3, s // 2) for s in range(RUN_STEPS)]
    lasso = _logged(tmp_path / "straight", "train/group_lasso")
    assert all(v > 0 for v in lasso[:6]) and all(v == 0 for v in lasso[6:])
    final = saved_tree(tmp_path / "straight", RUN_STEPS)
    masks = {k: v for k, v in final.items()
             if k.startswith("model_state/") and k.endswith("/mask")}
    assert len(masks) == sum(RUN_MODEL["stages"])
    for mask in masks.values():
        assert (mask.sum(0) == mask.shape[0] // 4).all() and set(np.unique(mask)) == {0, 1}

    task = condensation.TASK
    stop_at = 4  # SIGTERM while drawing the batch of step 4: the run stops after it

    def train_data(config, **kwargs):
        batches = task.train_data(config, **kwargs)
        draw, drawn = batches.__next__, [0]

        class Interrupting(type(batches)):
            def __next__(self):
                drawn[0] += 1
                if drawn[0] == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return draw()

        batches.__class__ = Interrupting
        return batches

    monkeypatch.setattr(condensation, "TASK", task._replace(train_data=train_data))
    stopped = loop.run(config, str(tmp_path / "resumed"))
    assert stopped.preempted and stopped.step == stop_at
    monkeypatch.setattr(condensation, "TASK", task)
    resumed = loop.run(config, str(tmp_path / "resumed"))
    assert resumed.final_line == straight.final_line
    again = saved_tree(tmp_path / "resumed", RUN_STEPS)
    assert list(again) == list(final)
    for key, value in final.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
