"""EfficientDet D0-D7x: the official variant table, parameter and BatchNorm counts equal to the
official model's (tests/reference/efficientdet_official.json) for all nine, by part, and the
per-level class and box outputs equal to effdet's `tf_efficientdet_*` on converted random
weights: D0, the sum-fusion path, the P3-P8 graph, and input sizes that are not multiples of
128 (where levels upsample to stored sizes, not by x2)."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import bifpn
from tests import reference
from tests.helpers import count, reference_figures

VARIANTS = [n for n in nets.list_models("efficientdet_*") if nets.model_info(n).task == "detection"]
KEYS = ["D0", "D1", "D2", "D3", "D4", "D5", "D6", "D7", "D7x"]
OFFICIAL = reference_figures("efficientdet_official.json")["variants"]


def test_the_nine_variants_are_the_official_table():
    """§1 of the reference notes: backbone, input, BiFPN width and cells, head repeats, anchor
    scale, levels, fusion."""
    assert [f"efficientdet_{k.lower()}" for k in KEYS] == VARIANTS
    table = {
        "d0": (0, 512, 64, 3, 3, 4.0, 7, "fastattn"), "d1": (1, 640, 88, 4, 3, 4.0, 7, "fastattn"),
        "d2": (2, 768, 112, 5, 3, 4.0, 7, "fastattn"),
        "d3": (3, 896, 160, 6, 4, 4.0, 7, "fastattn"),
        "d4": (4, 1024, 224, 7, 4, 4.0, 7, "fastattn"),
        "d5": (5, 1280, 288, 7, 4, 4.0, 7, "fastattn"), "d6": (6, 1280, 384, 8, 5, 4.0, 7, "sum"),
        "d7": (6, 1536, 384, 8, 5, 5.0, 7, "sum"), "d7x": (7, 1536, 384, 8, 5, 4.0, 8, "sum")}
    for key, row in table.items():
        info = nets.model_info(f"efficientdet_{key}")
        c, meta = info.config, info.task_metadata
        assert (c["backbone"], info.train_size, c["fpn_width"], c["fpn_cells"],
                c["head_repeats"], meta["anchor_scale"], c["max_level"], c["fusion"]) == row
        assert info.task == "detection" and info.test_size == meta["image_size"] == row[1]
        assert (meta["min_level"], meta["max_level"], meta["num_scales"],
                len(meta["aspect_ratios"]), meta["num_classes"]) == (3, row[6], 3, 3, 90)
        assert c["num_anchors"] == 9
        assert c["drop_connect_rate"] == (0.0 if key == "d0" else 0.2)  # off for B0
        assert info.feature_strides == tuple(2 ** k for k in range(3, row[6] + 1))


def _trees(name, num_classes=90):
    """(params, state) shapes of the variant, traced with zero initialisers (fast)."""
    def forward(images):
        with nets.registry.zero_init():
            return nets.create(name, num_classes)(images, is_training=True)

    images = nets.introspect.example_images(name, 1, 256)
    return jax.eval_shape(hk.transform_with_state(forward).init, jax.random.key(0), images)


PARTS = {"backbone": "efficientdet/backbone", "bifpn": "efficientdet/fpn",
         "class_net": "efficientdet/class_net", "box_net": "efficientdet/box_net"}


@pytest.mark.parametrize("key", KEYS)
def test_counts_equal_the_official_model_by_part(key):
    name = f"efficientdet_{key.lower()}"
    params, state = _trees(name)
    figures, info = OFFICIAL[key], nets.model_info(name)
    assert (count(params), count(state)) == (figures["params"]["total"],
                                             figures["bn_stat_elems"]["total"])
    assert (info.reference_params, info.reference_bn_stat_elems) == (
        figures["params"]["total"], figures["bn_stat_elems"]["total"])
    for part, prefix in PARTS.items():
        assert count({m: v for m, v in params.items() if m.startswith(prefix)}) == (
            figures["params"][part]), part
        assert count({m: v for m, v in state.items() if m.startswith(prefix)}) == (
            figures["bn_stat_elems"][part]), part
        assert len([m for m in state if m.startswith(prefix)]) == figures["bn_layers"][part]
    assert count({m: v for m, v in params.items() if m.startswith(
        "efficientdet/fpn/resample_p")}) == figures["params"]["bifpn_extra_level_resample"]
    assert count({m: {"w": v["fusion_weights"]} for m, v in params.items()
                  if "fusion_weights" in v}) == figures["params"]["bifpn_fusion_weights"]


def test_multiply_adds_of_d0_are_the_reference_conv_count():
    """Convolutions only, at 512 px: the reference's 4,984,663,040 FLOPs = 2 x MACs."""
    from tools import summary

    _, macs = summary.totals(summary.summary("efficientdet_d0", num_classes=90))
    assert macs * 2 == 4_984_663_040


def test_initialisation_is_the_official_one():
    """Class predict bias -log(0.99 / 0.01), box biases zero, fusion weights 1; BiFPN kernels
    Glorot-uniform, head kernels variance scaling over Keras' fan-in (depthwise: 9 x C)."""
    inits = {}

    def record(next_creator, shape, dtype, init, context):
        inits[context.full_name] = (shape, init)
        return jnp.zeros(shape, dtype)

    def forward(images):
        with hk.custom_creator(record, params=True, state=False):
            return nets.create("efficientdet_d0", 90)(images, is_training=True)

    jax.eval_shape(hk.transform_with_state(forward).init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32))

    def draw(key):  # initialisers draw from Haiku's key sequence: inside a transform
        shape, init = inits[key]
        return np.asarray(hk.transform(lambda: init(shape, jnp.float32)).apply(
            {}, jax.random.key(0)))

    prior = -math.log((1 - 0.01) / 0.01)
    np.testing.assert_allclose(draw("efficientdet/class_net/predict/conv_pw/b"), prior, rtol=1e-6)
    assert not draw("efficientdet/box_net/predict/conv_pw/b").any()
    assert not draw("efficientdet/class_net/conv_rep_0/conv_pw/b").any()
    assert (draw("efficientdet/fpn/cell_0/node_0/fusion_weights") == 1).all()
    # Glorot-uniform on the depthwise (3, 3, 64, 1) Keras kernel: limit sqrt(6 / (9*64 + 9)).
    dw = draw("efficientdet/fpn/cell_1/node_2/conv/conv_dw/w")
    assert dw.shape == (3, 3, 1, 64)
    assert 0.9 < np.abs(dw).max() / math.sqrt(6 / (9 * 64 + 9)) <= 1
    # Head depthwise: std 1 / sqrt(9 * 64); pointwise: 1 / sqrt(64).
    assert np.std(draw("efficientdet/class_net/conv_rep_1/conv_dw/w")) == pytest.approx(
        1 / math.sqrt(9 * 64), rel=0.15)
    assert np.std(draw("efficientdet/box_net/predict/conv_pw/w")) == pytest.approx(
        1 / 8, rel=0.1)


def test_resampling_follows_the_official_rules():
    x = jnp.arange(2 * 5 * 7 * 1, dtype=jnp.float32).reshape(2, 5, 7, 1)
    # down: 3x3/2 SAME max-pool, the extra padding at the bottom/right
    assert bifpn.resample(x, (3, 4)).shape == (2, 3, 4, 1)
    np.testing.assert_array_equal(bifpn.resample(x, (3, 4))[0, :, :, 0],
                                  [[8, 10, 12, 13], [22, 24, 26, 27], [29, 31, 33, 34]])
    # up: TF v1 nearest, source floor(i * in / out): 2 -> 3 reads rows 0, 0, 1
    y = jnp.asarray([[[[1.0], [2.0]], [[3.0], [4.0]]]])
    np.testing.assert_array_equal(bifpn.resample(y, (3, 4))[0, :, :, 0],
                                  [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4]])
    assert bifpn.node_graph(3, 8) == [
        (7, (4, 5)), (6, (3, 6)), (5, (2, 7)), (4, (1, 8)), (3, (0, 9)), (4, (1, 9, 10)),
        (5, (2, 8, 11)), (6, (3, 7, 12)), (7, (4, 6, 13)), (8, (5, 14))]


# ----------------------------------------------------------------------------------------------
# Outputs against effdet on converted weights.


def _effdet_model(variant, images, **config_overrides):
    """effdet's model of `variant` with config fields replaced (never pretrained), weights
    random: He-normal convs, random biases, fusion weights N(0, 1) but the first of each node
    positive (some negative, so that their ReLU matters: an all-negative node would cut the
    image's signal off). BatchNorm affines random; statistics those of each BatchNorm's input
    on `images` (NCHW) in eval mode, the variances raised by their channel mean. Statistics
    drawn independently of the data make the image's part of the signal fade ~20x per
    backbone stage behind the BN offsets (the outputs hardly depend on the image, so a bug
    would hide below the tolerance); statistics off the data's by a few percent compound over
    the ~100 BatchNorms into outputs of 1e3-1e5; and a near-constant channel (at a 1x1 level)
    with its own tiny variance amplifies float32 rounding up to 1 / sqrt(eps) = 31x per
    BatchNorm."""
    torch, effdet = reference.torch(), reference.effdet()
    config = effdet.get_efficientdet_config(variant)
    for key, value in {"image_size": tuple(images.shape[2:]), **config_overrides}.items():
        setattr(config, key, value)
    config.num_levels = config.max_level - config.min_level + 1
    model = effdet.create_model_from_config(config, pretrained=False,
                                            pretrained_backbone=False)
    gen = torch.Generator().manual_seed(0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("edge_weights"):
                p.copy_(torch.randn(p.shape, generator=gen))
                p[0] = p[0].abs() + 0.5
            elif p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) * (2 / p[0].numel()) ** 0.5)
            elif key.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for m in norms:
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.2)

        def calibrate(norm, inputs):  # in call order, so each sees the calibrated ones before
            x = inputs[0]
            norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            norm.running_var.copy_(var + var.mean())

        hooks = [m.register_forward_pre_hook(calibrate) for m in norms]
        model.eval()(images)
        for hook in hooks:
            hook.remove()
    return model


CASES = {  # id: (our variant, overrides, effdet variant, its config changes, image (h, w))
    "d0_128px": ("efficientdet_d0", {}, "tf_efficientdet_d0", {}, (128, 128)),
    "sum_fusion_128px": ("efficientdet_d6", dict(backbone=0, fpn_width=32, fpn_cells=2,
                                                head_repeats=2),
                        "tf_efficientdet_d6", dict(backbone_name="tf_efficientnet_b0",
                                                   fpn_channels=32, fpn_cell_repeats=2,
                                                   box_class_repeats=2), (128, 128)),
    "p3_p8_256px": ("efficientdet_d7x", dict(backbone=0, fpn_width=32, fpn_cells=2,
                                             head_repeats=2),
                    "tf_efficientdet_d7x", dict(backbone_name="tf_efficientnet_b0",
                                                fpn_channels=32, fpn_cell_repeats=2,
                                                box_class_repeats=2), (256, 256)),
    "d0_160x224px": ("efficientdet_d0", dict(fpn_width=32, fpn_cells=2, head_repeats=2),
                     "tf_efficientdet_d0", dict(fpn_channels=32, fpn_cell_repeats=2,
                                                box_class_repeats=2), (160, 224)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_effdet_on_converted_weights(case):
    name, overrides, variant, changes, (h, w) = CASES[case]
    torch = reference.torch()
    images = np.random.RandomState(0).randn(2, h, w, 3).astype(np.float32)
    model = _effdet_model(variant, torch.from_numpy(images).permute(0, 3, 1, 2), **changes)
    with torch.no_grad():
        ref_class, ref_box = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    # num_classes comes from the checkpoint: 810 class outputs = 9 anchors x 90 classes
    params, state = nets.convert.from_torch(name, model.state_dict(), **overrides)
    assert nets.introspect.num_classes_of(name, params, overrides) == 90
    f = nets.transformed(name, 90, **overrides)
    out, _ = jax.jit(f.apply, static_argnames="is_training")(params, state, None, images,
                                                             is_training=False)
    levels = nets.model_info(name).task_metadata["max_level"] - 2
    assert len(out["class"]) == len(out["box"]) == len(ref_class) == levels
    sizes = bifpn.level_sizes((h, w), 3 + levels - 1)[3:]
    for ours, ref, k in ((out["class"], ref_class, 810), (out["box"], ref_box, 36)):
        for level, (a, b) in enumerate(zip(ours, ref)):
            b = b.permute(0, 2, 3, 1).numpy()
            assert a.shape == b.shape == (2, *sizes[level], k)
            assert np.abs(b[0] - b[1]).max() > 0.05  # the outputs depend on the image
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=0,
                                       err_msg=f"{case} level P{level + 3}")


def test_the_outputs_feed_the_detection_primitives_anchor_for_anchor():
    """A registry row's task_metadata gives the anchors the model's outputs line up with: one
    anchor per (level, cell, anchor) output row, and the loss and post-processing take the
    outputs as they are (traced only: jax.eval_shape)."""
    import detection

    info = nets.model_info("efficientdet_d0")
    meta, size, batch = info.task_metadata, 128, 2
    anchors = detection.generate_anchors(size, meta["min_level"], meta["max_level"],
                                         meta["num_scales"], meta["aspect_ratios"],
                                         meta["anchor_scale"])
    f = nets.transformed("efficientdet_d0")
    assert nets.default_num_classes("efficientdet_d0") == meta["num_classes"] == 90

    def detect(images, boxes, labels):
        params, state = f.init(jax.random.key(0), images, is_training=True)
        out, _ = f.apply(params, state, None, images, is_training=False)
        targets = detection.assign_targets_batch(anchors, boxes, labels)
        loss = detection.detection_loss(out["class"], out["box"], targets, meta["num_classes"])
        found = detection.generate_detections(out["class"], out["box"], anchors,
                                              meta["num_classes"], jnp.ones((batch,)))
        return out, loss, found

    out, loss, found = jax.eval_shape(
        detect, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch, 5, 4), jnp.float32),
        jax.ShapeDtypeStruct((batch, 5), jnp.int32))
    rows = sum(x.shape[1] * x.shape[2] * x.shape[3] // meta["num_classes"]
               for x in out["class"])
    assert rows == anchors.shape[0] == sum(x.shape[1] * x.shape[2] * x.shape[3] // 4
                                           for x in out["box"])
    assert loss.total.shape == () and found.boxes.shape == (batch, 100, 4)


# ----------------------------------------------------------------------------------------------
# The official google/automl Keras model's variable names (spec §19.1), for its checkpoints.


def _official_names(name):
    """{official name: shape} of every leaf (zero-size views: nothing is allocated) and the
    number of names the leaves should give (a fusion weight vector is one scalar per input)."""
    params, state = _trees(name)
    zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), (params, state))
    official = nets.convert.to_efficientdet_official(name, *zeros)
    expected = sum(len(v) if leaf == "fusion_weights" else 1 for tree in (params, state)
                   for leaves in tree.values() for leaf, v in leaves.items())
    return {k: v.shape for k, v in official.items()}, expected, count(params) + count(state)


@pytest.mark.parametrize("key", ["d0", "d7x"])
def test_every_leaf_has_its_own_official_name(key):
    names, expected, elements = _official_names(f"efficientdet_{key}")
    assert len(names) == expected  # distinct: none collapsed into another
    assert sum(math.prod(s) for s in names.values()) == elements
    assert not [n for n in names if n.startswith(("resample_p7", "resample_p8"))]  # max-pools
    if key == "d7x":  # P3-P8: fnode k of a 6-level cell is built on 6 + k maps; "sum" fusion
        assert "fpn_cells/cell_7/fnode9/op_after_combine15/conv/pointwise_kernel" in names
        assert names["fpn_cells/cell_0/fnode4/resample_0_0_10/conv2d/kernel"] == (1, 1, 80, 384)
        assert names["fpn_cells/cell_0/fnode6/resample_0_2_12/bn/gamma"] == (384,)
        assert "class_net/class-4-bn-8/moving_variance" in names
        assert "efficientnet-b7/blocks_54/tpu_batch_normalization_2/gamma" in names
        assert not [n for n in names if "WSM" in n or "blocks_55" in n]


def test_official_names_of_d0_are_the_spec_patterns():
    names, _, _ = _official_names("efficientdet_d0")
    literal = {
        "resample_p6/conv2d/kernel": (1, 1, 320, 64), "resample_p6/bn/moving_mean": (64,),
        # first-cell resamples: resample_{position}_{input id}_{5 + node}, C5 -> fnode1 ...
        "fpn_cells/cell_0/fnode1/resample_0_2_6/conv2d/kernel": (1, 1, 320, 64),
        "fpn_cells/cell_0/fnode2/resample_0_1_7/bn/gamma": (64,),
        "fpn_cells/cell_0/fnode3/resample_0_0_8/conv2d/bias": (64,),
        "fpn_cells/cell_0/fnode4/resample_0_1_9/conv2d/kernel": (1, 1, 112, 64),
        "fpn_cells/cell_0/fnode5/resample_0_2_10/bn/moving_variance": (64,),
        "fpn_cells/cell_2/fnode4/WSM_2": (), "fpn_cells/cell_0/fnode0/WSM": (),
        "fpn_cells/cell_1/fnode0/op_after_combine5/conv/depthwise_kernel": (3, 3, 64, 1),
        "fpn_cells/cell_1/fnode7/op_after_combine12/conv/pointwise_kernel": (1, 1, 64, 64),
        "fpn_cells/cell_1/fnode7/op_after_combine12/bn/beta": (64,),
        "class_net/class-0/depthwise_kernel": (3, 3, 64, 1),
        "class_net/class-0-bn-3/gamma": (64,), "class_net/class-2-bn-7/moving_mean": (64,),
        "class_net/class-predict/bias": (810,),
        "box_net/box-predict/pointwise_kernel": (1, 1, 64, 36), "box_net/box-1/bias": (64,),
        "efficientnet-b0/stem/conv2d/kernel": (3, 3, 3, 32),
        "efficientnet-b0/stem/tpu_batch_normalization/beta": (32,),
        # blocks_0 has no expansion: depthwise, BN, SE, projection conv2d, BN _1
        "efficientnet-b0/blocks_0/depthwise_conv2d/depthwise_kernel": (3, 3, 32, 1),
        "efficientnet-b0/blocks_0/conv2d/kernel": (1, 1, 32, 16),
        "efficientnet-b0/blocks_0/tpu_batch_normalization_1/moving_variance": (16,),
        "efficientnet-b0/blocks_1/conv2d/kernel": (1, 1, 16, 96),
        "efficientnet-b0/blocks_1/tpu_batch_normalization/gamma": (96,),
        "efficientnet-b0/blocks_1/se/conv2d/kernel": (1, 1, 96, 4),
        "efficientnet-b0/blocks_1/se/conv2d_1/bias": (96,),
        "efficientnet-b0/blocks_1/conv2d_1/kernel": (1, 1, 96, 24),
        "efficientnet-b0/blocks_1/tpu_batch_normalization_2/beta": (24,),
        "efficientnet-b0/blocks_15/depthwise_conv2d/depthwise_kernel": (3, 3, 1152, 1)}
    assert {k: names.get(k) for k in literal} == literal
    assert "efficientnet-b0/blocks_16/conv2d/kernel" not in names
    assert not [n for n in names if "fnode0/resample" in n or "cell_1/fnode1/resample" in n]


REDUCED = dict(fpn_width=32, fpn_cells=2, head_repeats=2)


def _random_official(num_classes=10):
    params, state = nets.introspect.shapes("efficientdet_d0", num_classes, **REDUCED)
    rng = np.random.default_rng(0)
    params, state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                 (params, state))
    official = nets.convert.to_efficientdet_official("efficientdet_d0", params, state, **REDUCED)
    return params, state, official


def test_official_round_trip_with_ema_copies_and_training_variables():
    params, state, official = _random_official()
    from_official = nets.convert.from_efficientdet_official
    back = from_official("efficientdet_d0", official, **REDUCED)  # num_classes: the file's, 10
    jax.tree.map(np.testing.assert_array_equal, back, (params, state))
    # A checkpoint as tf.train.load_checkpoint lists it: the EMA copies (loaded by default, as
    # the official evaluation does), the raw variables, optimizer slots and global_step; or
    # Keras' variable names, with ":0".
    ckpt = {"global_step": np.int64(7),
            **{k: np.zeros_like(v) for k, v in official.items()},
            **{f"{k}/Momentum": np.zeros_like(v) for k, v in official.items()},
            **{f"{k}/ExponentialMovingAverage": v for k, v in official.items()}}
    jax.tree.map(np.testing.assert_array_equal,
                 from_official("efficientdet_d0", ckpt, **REDUCED), (params, state))
    raw, _ = from_official("efficientdet_d0", ckpt, ema=False, **REDUCED)
    assert not np.any(raw["efficientdet/fpn/cell_1/node_4"]["fusion_weights"])
    partial = {k: v for k, v in ckpt.items() if k != "box_net/box-1/bias/ExponentialMovingAverage"}
    with pytest.raises(ValueError, match=r"missing \(1\): box_net/box-1/bias/Exponential"):
        from_official("efficientdet_d0", partial, **REDUCED)
    keras = {f"{k}:0": v for k, v in official.items()}
    jax.tree.map(np.testing.assert_array_equal,
                 from_official("efficientdet_d0", keras, **REDUCED), (params, state))


def test_official_names_that_do_not_fit_are_listed():
    _, _, official = _random_official()
    gone = "fpn_cells/cell_1/fnode4/WSM_2"
    broken = {k: v for k, v in official.items() if k != gone}
    broken["fpn_cells/cell_2/fnode0/WSM"] = np.float32(1)
    with pytest.raises(ValueError, match=r"(?s)official EfficientDet checkpoint into "
                       r"efficientdet_d0 .*missing \(1\): fpn_cells/cell_1/fnode4/WSM_2 "
                       r".*unexpected \(1\): fpn_cells/cell_2/fnode0/WSM"):
        nets.convert.from_efficientdet_official("efficientdet_d0", broken, **REDUCED)
    with pytest.raises(ValueError, match="no ExponentialMovingAverage copies"):
        nets.convert.from_efficientdet_official("efficientdet_d0", official, ema=True, **REDUCED)
    with pytest.raises(ValueError, match="not an EfficientDet with an official"):
        nets.convert.from_efficientdet_official("efficientdet_d0_keypoints", official)
    with pytest.raises(ValueError, match="not an NFNet"):
        nets.convert.from_nfnet_official("efficientdet_d0", official)
