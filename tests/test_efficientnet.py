"""EfficientNet B0-B7: counts, compound scaling, the block structure and the official inits.
Outputs against keras.applications: tests/test_keras_reference.py."""

import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import efficientnet
from tests.helpers import jitted_apply, random_images

VARIANTS = nets.list_models("efficientnet_b*")


def test_all_eight_variants_are_registered_with_the_papers_resolutions():
    assert [f"efficientnet_b{k}" for k in range(8)] == VARIANTS
    sizes = [nets.model_info(n).test_size for n in VARIANTS]
    assert sizes == [224, 240, 260, 300, 380, 456, 528, 600]
    assert [nets.model_info(n).config["dropout_rate"] for n in VARIANTS] == [
        0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5]


@pytest.mark.parametrize("name", VARIANTS)
def test_registry_figures_are_torchvisions_too(name, reference_counts):
    """Keras' counts (the reference) equal torchvision's; tests/test_all_models.py counts ours
    against the registry's figures."""
    info = nets.model_info(name)
    row = reference_counts[("torchvision", name)]
    assert (info.reference_params, info.reference_params_no_head,
            info.reference_bn_stat_elems) == (row["params_with_head"], row["params_no_head"],
                                              row["bn_stat_elems"])


def _hand_count_b0():
    """B0 counted from the paper's Table 1 and the block definition: every conv without bias
    followed by BN (2 parameters per channel), SE FCs with biases from the input width / 4."""
    total, c_in = 3 * 3 * 3 * 32 + 2 * 32, 32
    for kernel, repeats, _, c_out, expand, _ in efficientnet.B0_STAGES:
        for _ in range(repeats):
            mid = c_in * expand
            if expand != 1:
                total += c_in * mid + 2 * mid
            total += kernel * kernel * mid + 2 * mid
            se = max(1, int(c_in * 0.25))
            total += mid * se + se + se * mid + mid
            total += mid * c_out + 2 * c_out
            c_in = c_out
    total += c_in * 1280 + 2 * 1280
    return total + 1280 * 1000 + 1000


def test_the_hand_count_reproduces_b0():
    assert _hand_count_b0() == nets.model_info("efficientnet_b0").reference_params


def test_compound_scaling_rounds_widths_and_depths_as_the_reference():
    assert [efficientnet.round_filters(c, 1.1) for c in (32, 16, 24, 40, 80, 112, 192, 320,
                                                          1280)] == [
        32, 16, 24, 48, 88, 120, 208, 352, 1408]
    assert [efficientnet.round_repeats(r, 3.1) for r in (1, 2, 2, 3, 3, 4, 1)] == [
        4, 7, 7, 10, 10, 13, 4]
    params, _ = nets.introspect.shapes("efficientnet_b7", 1000)
    blocks = {m.split("/")[1] for m in params if "/block" in m}
    assert len(blocks) == 55  # 4 + 7 + 7 + 10 + 10 + 13 + 4


def test_se_width_comes_from_the_block_input_not_the_expansion():
    params, _ = nets.introspect.shapes("efficientnet_b0", 1000)
    # block2a: 16 -> (x6 = 96) -> 24; SE reduces 96 channels to int(16 * 0.25) = 4.
    assert params["efficientnet/block2a/se/reduce"]["w"].shape == (96, 4)
    assert params["efficientnet/block2b/se/reduce"]["w"].shape == (144, 6)
    assert "efficientnet/block1a/expand_conv" not in params  # expand ratio 1


def test_drop_connect_rate_grows_linearly_from_zero_with_the_block_index():
    rates = {}
    real = nets.layers.stochastic_depth

    def spy(x, rate, is_training, *args):
        rates[hk.experimental.current_name()] = rate
        return real(x, rate, is_training, *args)

    f = nets.transformed("efficientnet_b0", drop_connect_rate=0.2)
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nets.layers, "stochastic_depth", spy)
        jax.eval_shape(lambda: f.init(jax.random.key(0), images, is_training=True))
    # 16 blocks; only blocks with an identity shortcut use it: index b gets 0.2 * b / 16.
    got = {re.search(r"block\w+", name)[0]: rate for name, rate in rates.items()}
    assert got["block2b"] == pytest.approx(0.2 * 2 / 16)
    assert got["block6d"] == pytest.approx(0.2 * 14 / 16)
    # No shortcut where the stride is 2 or the width changes (32 -> 16, 80 -> 112, 192 -> 320).
    assert not {"block1a", "block2a", "block5a", "block7a"} & set(got)
    assert len(got) == 9


# A narrow, shallow EfficientNet (repeats [1, 1, 1, 2, 2, 2, 1]) keeps compiles short.
TINY = dict(width=0.25, depth=0.5)


def test_drop_connect_drops_whole_samples_in_training_only():
    f = jitted_apply("efficientnet_b0", num_classes=10, drop_connect_rate=0.9, dropout_rate=0.0,
                     **TINY)
    images = random_images(2, 32)
    init = jax.jit(nets.transformed("efficientnet_b0", 10, **TINY).init,
                   static_argnames="is_training")
    params, state = init(jax.random.key(0), images, is_training=True)
    eval_a, _ = f(params, state, None, images, is_training=False)
    eval_b, _ = f(params, state, None, images, is_training=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = [f(params, state, jax.random.key(i), images, is_training=True)[0] for i in range(2)]
    assert np.abs(train[0] - train[1]).max() > 1e-3


def test_the_official_initialisers():
    # Conv: truncated N(0, 2 / fan_out); Keras counts a depthwise kernel's fan-out as k * k.
    key = jax.random.key(0)
    sample = lambda init, shape: hk.transform(lambda: init(shape, jnp.float32)).apply(  # noqa
        {}, key)
    project = sample(efficientnet.CONV_INIT, (1, 1, 672, 192))
    assert np.std(project) == pytest.approx(np.sqrt(2.0 / 192), rel=0.05)
    depthwise = sample(efficientnet.DEPTHWISE_INIT, (5, 5, 1, 672))
    assert np.std(depthwise) == pytest.approx(np.sqrt(2.0 / 25), rel=0.05)
    assert np.abs(depthwise).max() <= 2 * np.sqrt(2.0 / 25) / 0.8796 + 1e-6  # truncated at 2 sd
    # ... and the model uses them: its depthwise kernels have std sqrt(2 / 9) or sqrt(2 / 25).
    f = nets.transformed("efficientnet_b0", **TINY)
    params, state = jax.jit(f.init, static_argnames="is_training")(
        key, jnp.zeros((1, 32, 32, 3)), is_training=True)
    dw = params["efficientnet/block3a/dwconv"]["w"]  # 5x5, 24 / 4 -> 8 * 6 = 48 channels
    assert dw.shape == (5, 5, 1, 48)
    assert np.std(dw) == pytest.approx(np.sqrt(2.0 / 25), rel=0.15)
    dense = params["efficientnet/predictions"]  # U(+-1 / sqrt(fan_out))
    assert np.abs(dense["w"]).max() <= 1 / np.sqrt(1000) and np.std(dense["w"]) > 0.017
    assert not np.any(dense["b"])
    assert all(np.all(leaves["var"] == 1) for leaves in state.values())


def test_features_are_the_last_block_outputs_at_strides_4_to_32():
    f = nets.transformed_features("efficientnet_b3")
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   images)
    maps, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                             params, state, images)
    # B3 widths: round_filters(32, 40, 136, 384 at x1.2) = 32, 48, 136, 384.
    assert {k: v.shape[1:] for k, v in maps.items()} == {
        "stage1": (16, 16, 32), "stage2": (8, 8, 48), "stage3": (4, 4, 136),
        "stage4": (2, 2, 384)}
