"""CSPNet (nets/csp.py): counts equal timm's, outputs equal timm's on converted weights (random
init, BN randomised; eval and train mode), feature strides, option and input errors."""


import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import (assert_registry_figures_are_the_tables, jitted_apply,
                           jitted_logits_and_features, random_images)

CSP = [n for n in nets.list_models() if nets.model_info(n).family == "csp"]
SIZE = 64  # small, to keep compiles cheap; the last stage still sees a 2x2 map


def test_the_three_timm_variants_are_registered():
    assert CSP == ["cspdarknet53", "cspresnet50", "cspresnext50"]


@pytest.mark.parametrize("name", CSP)
def test_registry_figures_are_those_of_the_shared_reference_table(name, reference_counts):
    assert_registry_figures_are_the_tables(name, reference_counts)
    info = nets.model_info(name)
    row = reference_counts[tuple(info.reference.split(":"))]
    assert info.train_size == info.test_size == row["input_res"] == 256


def _timm_model(name, **kwargs):
    torch = reference.torch()
    torch.manual_seed(0)
    model = reference.timm().create_model(name, **kwargs).eval()
    reference.randomize_batchnorm(model)
    with torch.no_grad():  # a head of timm's init (std 0.01) would make tiny logits
        model.head.fc.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def _run_timm(model, images):
    """Logits and the stage outputs keyed by stride."""
    torch = reference.torch()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        logits = model(x).numpy()
        stages = model.forward_intermediates(x, intermediates_only=True)
    maps = {images.shape[1] // m.shape[-1]: m.numpy().transpose(0, 2, 3, 1) for m in stages}
    return logits, maps


def _check_against_timm(name, model, **overrides):
    images = random_images(2, SIZE)
    ref_logits, ref_maps = _run_timm(model, images)
    params, state = nets.convert.from_torch(name, model.state_dict(), **overrides)
    (logits, maps), _ = jitted_logits_and_features(name, **overrides)(params, state, None,
                                                                      images)
    assert np.abs(ref_logits).max() > 0.5  # a meaningful comparison, not of near-zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert sorted(maps) == ["stage1", "stage2", "stage3", "stage4"]
    for stage, stride in zip(("stage1", "stage2", "stage3", "stage4"), (4, 8, 16, 32)):
        np.testing.assert_allclose(maps[stage], ref_maps[stride], atol=1e-4, rtol=1e-4,
                                   err_msg=stage)


@pytest.mark.parametrize("name", CSP)
def test_logits_and_stage_maps_equal_timm(name):
    _check_against_timm(name, _timm_model(name))


def test_dark_stages_equal_timm_darknet17():
    """The "dark" stage kind, unused by the registered variants: timm's darknet17 (plain
    Darknet stages of one block each) is cspdarknet53 with these overrides."""
    darknet17 = dict(depths=(1,) * 5, stage_kind="dark", bottle_ratio=0.5, block_ratio=1.0)
    _check_against_timm("cspdarknet53", _timm_model("darknet17"), **darknet17)


def test_training_mode_outputs_and_running_statistics_equal_timm():
    torch = reference.torch()
    model = _timm_model("cspresnet50").train()
    images = random_images(2, SIZE, seed=3)
    params, state = nets.convert.from_torch("cspresnet50", model.state_dict())
    logits, new_state = jitted_apply("cspresnet50")(params, state, None, images,
                                                    is_training=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    _, ref_state = nets.convert.from_torch("cspresnet50", model.state_dict())
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), state, ref_state)
    assert all(jax.tree.leaves(changed))  # every running statistic moved in this step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 new_state, ref_state)


def _feature_shapes(name, size=SIZE, **overrides):
    f = nets.transformed_features(name, **overrides)
    images = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   images)
    maps, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                             params, state, images)
    return {k: v.shape for k, v in maps.items()}


@pytest.mark.parametrize("name", CSP)
def test_features_are_the_stages_at_the_registered_strides(name):
    info = nets.model_info(name)
    widths = info.config["widths"][-4:]
    assert info.feature_strides == (4, 8, 16, 32)
    assert _feature_shapes(name) == {
        f"stage{i + 1}": (1, SIZE // s, SIZE // s, w)
        for i, (s, w) in enumerate(zip(info.feature_strides, widths))}


def test_torch_names_follow_timm():
    config = nets.model_info("cspresnext50").config
    name = nets.model_info("cspresnext50").torch_name
    assert name("stem_conv1.conv", config) == "stem.conv1.conv"
    assert name("stages_1.blocks_0.conv2.bn", config) == "stages.1.blocks.0.conv2.bn"
    assert name("stages_0.conv_transition_b.conv", config) == "stages.0.conv_transition_b.conv"
    assert name("fc", config) == "head.fc"


def _bn_scales_at_init(block, **overrides):
    """The BN scales a narrow two-blocks-per-stage net initialises (same rules as the full
    nets). The other parameters are created as zeros: random initialisers would cost most of
    the compile."""

    def zeros_but_bn_scales(next_creator, shape, dtype, init, context):
        return next_creator(shape, dtype, init if context.name == "scale" else jnp.zeros)

    def forward(images):
        model = nets.create("cspresnet50", 10, block=block, depths=(2, 2, 2, 2),
                            widths=(16, 32, 64, 128), **overrides)
        with hk.custom_creator(zeros_but_bn_scales):
            return model(images, is_training=True)

    init = jax.jit(hk.transform_with_state(forward).init)
    params, _ = init(jax.random.key(0), random_images(1, 32))
    return {k: v["scale"] for k, v in params.items() if k.endswith("/bn")}


@pytest.mark.parametrize("block,last", [("bottleneck", "conv3"), ("dark", "conv2")])
def test_zero_init_last_zeroes_the_last_bn_of_every_block(block, last):
    scales = _bn_scales_at_init(block)
    in_blocks = {k: v for k, v in scales.items() if "/blocks_" in k}
    assert len(in_blocks) == 8 * (3 if block == "bottleneck" else 2)
    for module, scale in scales.items():
        assert np.all(scale == 0) == module.endswith(f"/{last}/bn"), module
        assert np.all(scale == 0) or np.all(scale == 1), module
    plain = _bn_scales_at_init(block, zero_init_last=False)
    assert all(np.all(scale == 1) for scale in plain.values())


def test_bad_input_and_option_values_are_rejected():
    def init(images=None, **overrides):
        images = random_images(1, 32) if images is None else images
        f = nets.transformed("cspresnet50", num_classes=10, **overrides)
        return jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True), images)

    with pytest.raises(ValueError, match=r"expects float images of shape .* rank 3"):
        init(images=np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="transpose NCHW to NHWC"):
        init(images=np.zeros((1, 3, 32, 32), np.float32))
    for bad, match in [(dict(stage_kind="dense"), "stage_kind must be one of"),
                       (dict(block="basic"), "block must be one of"),
                       (dict(activation="mish2"), "unknown activation"),
                       (dict(groups=(1, 32)), r"groups needs one value or one per stage \(4\)"),
                       (dict(widths=(128, 256)), "one entry per stage"),
                       (dict(block_ratio=0.5), "identity shortcuts need their input width"),
                       (dict(expand_ratio=3 / 128), "do not split into two halves")]:
        with pytest.raises(ValueError, match=match):
            init(**bad)
