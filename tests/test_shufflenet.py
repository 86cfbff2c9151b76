"""ShuffleNet V2 against torchvision (counts, eval and training outputs on converted weights);
ShuffleNet V1 against the paper (parameters and complexity counted by hand from Table 1) and
against a restatement of the authors' PyTorch code (megvii-model/ShuffleNet-Series): logits and
stage maps."""


import haiku as hk
import jax
import numpy as np
import pytest

import nets
from nets import layers, shufflenet
from tests import reference
from tests.helpers import jitted_apply, jitted_logits_and_features, random_images

V2 = nets.list_models("shufflenet_v2_*")
V1 = nets.list_models("shufflenet_v1_*")
SIZE = 64  # every V2 stage still sees a >= 2x2 map


def test_the_registered_variants():
    assert [f"shufflenet_v2_{w}" for w in ("x0_5", "x1_0", "x1_5", "x2_0")] == V2
    assert {f"shufflenet_v1_g{g}" for g in (1, 2, 3, 4, 8)} <= set(V1)
    assert {"shufflenet_v1_g3_x0_5", "shufflenet_v1_g3_x0_25", "shufflenet_v1_g8_x0_5"} <= set(V1)
    for name in V1 + V2:
        info = nets.model_info(name)
        assert (info.family, info.classifier, info.feature_strides) == (
            "shufflenet", "fc", (4, 8, 16, 32))
    assert nets.model_info("shufflenet_v2_x2_0").preprocessing.crop_fraction == 224 / 232


@pytest.mark.parametrize("name,widths", [("shufflenet_v2_x1_0", (24, 116, 232, 464, 1024)),
                                         ("shufflenet_v1_g3", (24, 240, 480, 960, 960))])
def test_features_and_pooled_outputs(name, widths):
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)

    def shapes_of(f):
        params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                       images)
        out, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                                params, state, images)
        return jax.tree.map(lambda a: a.shape, out)

    assert shapes_of(nets.transformed_features(name)) == {
        f"stage{i + 1}": (1, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2), widths[i]) for i in range(4)}
    # Without a head: V2's pooled conv5 output, V1's pooled stage 4.
    assert shapes_of(nets.transformed(name, 0)) == (1, widths[4])


# ----------------------------------------------------------------------------------------------
# ShuffleNet V2: torchvision


def test_v2_torch_names():
    name = nets.model_info("shufflenet_v2_x1_0").torch_name
    assert [name(p, {}) for p in ("conv1_0", "conv1_1", "stage2_0.branch1_2",
                                  "stage4_3.branch2_6", "conv5_0", "fc")] == [
        "conv1.0", "conv1.1", "stage2.0.branch1.2", "stage4.3.branch2.6", "conv5.0", "fc"]


def _torchvision_v2(width="x1_0", train=False):
    torch = reference.torch()
    torch.manual_seed(0)
    model = getattr(reference.torchvision().models, f"shufflenet_v2_{width}")()
    reference.randomize_batchnorm(model)
    return model.train(train)


def _run_torch(model, images, hooked=()):
    """Logits and the NHWC outputs of the hooked submodules ((key, module) pairs)."""
    torch = reference.torch()
    maps = {}
    hooks = [module.register_forward_hook(
        lambda m, inp, out, key=key: maps.__setitem__(key, out.numpy().transpose(0, 2, 3, 1)))
        for key, module in hooked]
    with torch.no_grad():
        logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    for hook in hooks:
        hook.remove()
    return logits, maps


def test_v2_logits_and_stage_maps_equal_torchvision():
    model = _torchvision_v2()
    images = random_images(2, SIZE)
    stages = [(f"stage{i}", getattr(model, f"stage{i}")) for i in (2, 3, 4)]
    stages = [("stage1", model.maxpool), *stages]
    ref_logits, ref_maps = _run_torch(model, images, stages)
    params, state = nets.convert.from_torch("shufflenet_v2_x1_0", model.state_dict(), 1000)
    apply = jitted_apply("shufflenet_v2_x1_0")
    logits, _ = apply(params, state, None, images, is_training=False)
    assert np.abs(ref_logits).max() > 0.1  # a meaningful comparison, not of zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    full_size = random_images(1, 224, seed=1)
    np.testing.assert_allclose(apply(params, state, None, full_size, is_training=False)[0],
                               _run_torch(model, full_size)[0], atol=1e-4, rtol=0)
    maps, _ = jitted_apply("shufflenet_v2_x1_0", features=True)(params, state, None, images,
                                                                is_training=False)
    assert set(maps) == set(ref_maps)
    for stage, ref_map in ref_maps.items():
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


def test_v2_training_outputs_and_running_statistics_equal_torchvision():
    model = _torchvision_v2(train=True)
    images = random_images(2, SIZE, seed=3)
    params, state = nets.convert.from_torch("shufflenet_v2_x1_0", model.state_dict(), 1000)
    logits, new_state = jitted_apply("shufflenet_v2_x1_0")(params, state, None, images,
                                                             is_training=True)
    ref_logits, _ = _run_torch(model, images)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    _, ref_state = nets.convert.from_torch("shufflenet_v2_x1_0", model.state_dict(), 1000)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 new_state, ref_state)


def test_v2_conversion_of_another_models_weights_lists_what_does_not_fit():
    tv = reference.torchvision()
    with pytest.raises(ValueError) as error:
        nets.convert.from_torch("shufflenet_v2_x1_0", tv.models.shufflenet_v2_x0_5().state_dict())
    message = str(error.value)
    assert "cannot convert this state dict into shufflenet_v2_x1_0" in message
    assert "shape mismatch" in message and "stage2.0.branch1.2.weight" in message
    with pytest.raises(ValueError, match=r"(?s)missing \(\d+\): conv1\.0\.weight.*"
                                         r"unexpected \(\d+\): bn1\.bias"):
        nets.convert.from_torch("shufflenet_v2_x1_0", tv.models.resnet18().state_dict())


# ----------------------------------------------------------------------------------------------
# ShuffleNet V1: the paper's Table 1, counted by hand

TABLE1 = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088),
          8: (384, 768, 1536)}
# name -> (g, s, stem width). Stems: the authors' code (12 at 0.5x, 16 for g=8 at 0.5x so that
# 192 - 16 divides by 8, 24 at 1x and 1.5x, 48 at 2x); 12 at 0.25x (see the complexity test).
V1_ROWS = {"shufflenet_v1_g1": (1, 1, 24), "shufflenet_v1_g2": (2, 1, 24),
           "shufflenet_v1_g3": (3, 1, 24), "shufflenet_v1_g4": (4, 1, 24),
           "shufflenet_v1_g8": (8, 1, 24),
           "shufflenet_v1_g3_x0_25": (3, 0.25, 12), "shufflenet_v1_g3_x0_5": (3, 0.5, 12),
           "shufflenet_v1_g3_x1_5": (3, 1.5, 24), "shufflenet_v1_g3_x2_0": (3, 2, 48),
           "shufflenet_v1_g8_x0_5": (8, 0.5, 16), "shufflenet_v1_g8_x1_5": (8, 1.5, 24),
           "shufflenet_v1_g8_x2_0": (8, 2, 48)}


def _v1_layers(g, s, stem, size=224):
    """Every conv as (kernel, c_in, c_out, groups, output size), then the classifier as
    (1, c_in, classes, 1, 1). Stem: 3x3 stride-2 conv, 3x3 stride-2 max pool. A unit with
    output width c: 1x1 conv to c/4 (groups 1 in stage 2's first unit, else g), 3x3
    depthwise (stride 2 in a stage's first unit), 1x1 conv with g groups to c, or to c - c_in
    in a stride-2 unit whose input (average-pooled) is concatenated."""
    convs, h = [(3, 3, stem, 1, size // 2)], size // 4
    c_in = stem
    for stage, (units, c) in enumerate(zip((4, 8, 4), (int(w * s) for w in TABLE1[g]))):
        for i in range(units):
            h_out = h // 2 if i == 0 else h
            convs += [(1, c_in, c // 4, 1 if stage == 0 and i == 0 else g, h),
                      (3, c // 4, c // 4, c // 4, h_out),
                      (1, c // 4, c - c_in if i == 0 else c, g, h_out)]
            c_in, h = c, h_out
    return convs + [(1, c_in, 1000, 1, 1)]


def _v1_params(convs):
    """Conv weights and their BN's scale and offset; the classifier has no bias (the authors'
    code)."""
    *body, (_, c_in, classes, _, _) = convs
    return sum(k * k * ci // grp * co + 2 * co for k, ci, co, grp, _ in body) + c_in * classes


def _v1_mult_adds(convs):
    return sum(k * k * ci // grp * co * h * h for k, ci, co, grp, h in convs)


def test_the_hand_count_is_that_of_an_independent_port():
    # osmr/imgclsmob's ShuffleNet (with a classifier bias, and a 6-wide stem at 0.25x) counts
    # 1,865,728 (g=3 1x), 2,434,768 (g=8 1x), 718,324 (g=3 0.5x), 305,902 (g=3 0.25x).
    assert _v1_params(_v1_layers(3, 1, 24)) + 1000 == 1_865_728
    assert _v1_params(_v1_layers(8, 1, 24)) + 1000 == 2_434_768
    assert _v1_params(_v1_layers(3, 0.5, 12)) + 1000 == 718_324
    assert _v1_params(_v1_layers(3, 0.25, 6)) + 1000 == 305_902


@pytest.mark.parametrize("name", V1)
def test_v1_parameters_equal_the_hand_count(name):
    g, s, stem = V1_ROWS[name]
    assert nets.introspect.count_params(name) == _v1_params(_v1_layers(g, s, stem))


# Paper, Table 1: complexity of the 1x networks in MFLOPs (multiply-adds), per g.
TABLE1_MFLOPS = {1: 143, 2: 140, 3: 137, 4: 133, 8: 137}


@pytest.mark.parametrize("g", sorted(TABLE1_MFLOPS))
def test_v1_complexity_is_the_papers_table_1(g):
    # Ours 143.1, 140.8, 137.5, 134.3, 138.4 M; the paper's figures are whole MFLOPs, and it
    # does not say whether they include the classifier (1.0-1.5M), so 1.5%.
    ours = _v1_mult_adds(_v1_layers(g, 1, 24)) / 1e6
    assert ours == pytest.approx(TABLE1_MFLOPS[g], rel=0.015)


@pytest.mark.parametrize("scale,mflops", [(1, 140), (0.5, 38), (0.25, 13)])
def test_v1_complexity_of_the_scaled_networks_is_the_papers_table_2(scale, mflops):
    # Ours at g=3: 137.5, 37.6, 13.3 M. Table 2 gives one nominal figure per scale for every g
    # (its 140 for 1x is Table 1's 133-143), so 3%. At 0.25x it fixes the stem: the 12-wide
    # stem gives 13.3M, the 6-wide one that 24 * 0.25 would give 11.0M.
    stem = V1_ROWS[{1: "shufflenet_v1_g3", 0.5: "shufflenet_v1_g3_x0_5",
                    0.25: "shufflenet_v1_g3_x0_25"}[scale]][2]
    assert _v1_mult_adds(_v1_layers(3, scale, stem)) / 1e6 == pytest.approx(mflops, rel=0.03)
    if scale == 0.25:
        assert _v1_mult_adds(_v1_layers(3, scale, 6)) / 1e6 < 0.87 * mflops


# The authors' README (megvii-model/ShuffleNet-Series, ShuffleNetV1): MFLOPs and M params.
OFFICIAL = {"shufflenet_v1_g3_x0_5": (38, 0.7), "shufflenet_v1_g8_x0_5": (40, 1.0),
            "shufflenet_v1_g3": (138, 1.9), "shufflenet_v1_g8": (138, 2.4),
            "shufflenet_v1_g3_x1_5": (292, 3.4), "shufflenet_v1_g8_x1_5": (290, 4.3),
            "shufflenet_v1_g3_x2_0": (524, 5.4), "shufflenet_v1_g8_x2_0": (522, 6.5)}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_v1_complexity_and_size_are_those_of_the_authors_models(name):
    mflops, mparams = OFFICIAL[name]
    convs = _v1_layers(*V1_ROWS[name])
    # Theirs are rounded: to whole MFLOPs (the 138 of g=3 1x is our 137.46 rounded up, so
    # 1%) and to 0.1M parameters.
    assert _v1_mult_adds(convs) / 1e6 == pytest.approx(mflops, rel=0.01, abs=0.6)
    assert abs(_v1_params(convs) / 1e6 - mparams) <= 0.05


def test_v1_first_pointwise_conv_of_stage_2_is_not_grouped():
    params, _ = nets.introspect.shapes("shufflenet_v1_g3")
    assert params["shufflenet_v1/stage2_0/conv1"]["w"].shape == (1, 1, 24, 60)
    assert params["shufflenet_v1/stage2_1/conv1"]["w"].shape == (1, 1, 80, 60)
    assert params["shufflenet_v1/stage2_0/conv3"]["w"].shape == (1, 1, 20, 216)
    assert params["shufflenet_v1/stage3_0/conv1"]["w"].shape == (1, 1, 80, 120)


def test_v1_widths_that_do_not_divide_into_the_groups_are_rejected():
    with pytest.raises(ValueError, match=r"bottleneck 34 .* must divide into 4 groups"):
        hk.transform(lambda: nets.create("shufflenet_v1_g4", width_multiplier=0.5)).init(None)
    with pytest.raises(ValueError, match="groups must be one of"):
        hk.transform(lambda: nets.create("shufflenet_v1_g3", groups=5)).init(None)


def test_v1_shuffle_channel_order():
    x = np.arange(18, dtype=np.float32)[None]
    # The authors' code: reshape (C / g, g), permute to (g, C / g), flatten.
    authors = np.arange(18).reshape(6, 3).T.ravel()
    np.testing.assert_array_equal(shufflenet.v1_shuffle(x, 3)[0], authors)
    # The inverse of the paper's (g, C / g) transpose.
    np.testing.assert_array_equal(shufflenet.v1_shuffle(layers.channel_shuffle(x, 3), 3), x)
    # Each group of the next grouped conv reads C / g^2 channels of every previous group.
    source_groups = (np.asarray(shufflenet.v1_shuffle(x, 3)[0]) // 6).reshape(3, 6)
    for row in source_groups:
        np.testing.assert_array_equal(np.bincount(row.astype(int), minlength=3), [2, 2, 2])


def test_v1_torch_names_are_the_authors_flat_sequence():
    name = nets.model_info("shufflenet_v1_g3").torch_name
    assert [name(p, {}) for p in ("stem_conv", "stem_bn", "stage2_0.conv1", "stage3_1.conv2",
                                  "stage4_3.bn3", "fc")] == [
        "first_conv.0", "first_conv.1", "features.0.branch_main_1.0",
        "features.5.branch_main_1.3", "features.15.branch_main_2.1", "classifier.0"]


def _authors_v1(torch, group, model_size, n_class=1000, input_size=224,
                stage_repeats=(4, 8, 4)):
    """The authors' ShuffleNetV1 (megvii-model/ShuffleNet-Series, ShuffleNetV1/blocks.py and
    network.py) restated: ShuffleV1Block (branch_main_1, channel_shuffle, branch_main_2, the
    branch_proj average pool of a stride-2 block) and ShuffleNetV1 (its stage_out_channels table
    per group and model size, first_conv, maxpool, one `features` sequence, globalpool,
    classifier), with the same module names. The global pool is network.py's AvgPool2d(7) for
    input_size 224, AvgPool2d(input_size // 32) here, so that small images work; stage_repeats
    (network.py's [4, 8, 4]) can be made shallower."""
    nn, F = torch.nn, torch.nn.functional

    class ShuffleV1Block(nn.Module):
        def __init__(self, inp, oup, *, group, first_group, mid_channels, ksize, stride):
            super().__init__()
            assert stride in [1, 2]
            self.stride, self.group = stride, group
            pad = ksize // 2
            outputs = oup - inp if stride == 2 else oup
            self.branch_main_1 = nn.Sequential(
                nn.Conv2d(inp, mid_channels, 1, 1, 0, groups=1 if first_group else group,
                          bias=False),
                nn.BatchNorm2d(mid_channels),
                nn.ReLU(),
                nn.Conv2d(mid_channels, mid_channels, ksize, stride, pad, groups=mid_channels,
                          bias=False),
                nn.BatchNorm2d(mid_channels))
            self.branch_main_2 = nn.Sequential(
                nn.Conv2d(mid_channels, outputs, 1, 1, 0, groups=group, bias=False),
                nn.BatchNorm2d(outputs))
            if stride == 2:
                self.branch_proj = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)

        def forward(self, old_x):
            x = self.branch_main_1(old_x)
            if self.group > 1:
                x = self.channel_shuffle(x)
            x = self.branch_main_2(x)
            if self.stride == 1:
                return F.relu(x + old_x)
            return torch.cat((self.branch_proj(old_x), F.relu(x)), 1)

        def channel_shuffle(self, x):
            batchsize, num_channels, height, width = x.size()
            group_channels = num_channels // self.group
            x = x.reshape(batchsize, group_channels, self.group, height, width)
            x = x.permute(0, 2, 1, 3, 4)
            return x.reshape(batchsize, num_channels, height, width)

    class ShuffleNetV1(nn.Module):
        def __init__(self):
            super().__init__()
            self.stage_repeats = list(stage_repeats)
            self.stage_out_channels = {
                (3, "0.5x"): [-1, 12, 120, 240, 480], (3, "1.0x"): [-1, 24, 240, 480, 960],
                (3, "1.5x"): [-1, 24, 360, 720, 1440], (3, "2.0x"): [-1, 48, 480, 960, 1920],
                (8, "0.5x"): [-1, 16, 192, 384, 768], (8, "1.0x"): [-1, 24, 384, 768, 1536],
                (8, "1.5x"): [-1, 24, 576, 1152, 2304], (8, "2.0x"): [-1, 48, 768, 1536, 3072],
            }[group, model_size]
            input_channel = self.stage_out_channels[1]
            self.first_conv = nn.Sequential(nn.Conv2d(3, input_channel, 3, 2, 1, bias=False),
                                            nn.BatchNorm2d(input_channel), nn.ReLU())
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            features = []
            for idxstage, numrepeat in enumerate(self.stage_repeats):
                output_channel = self.stage_out_channels[idxstage + 2]
                for i in range(numrepeat):
                    features.append(ShuffleV1Block(
                        input_channel, output_channel, group=group,
                        first_group=idxstage == 0 and i == 0, mid_channels=output_channel // 4,
                        ksize=3, stride=2 if i == 0 else 1))
                    input_channel = output_channel
            self.features = nn.Sequential(*features)
            self.globalpool = nn.AvgPool2d(input_size // 32)
            self.classifier = nn.Sequential(
                nn.Linear(self.stage_out_channels[-1], n_class, bias=False))

        def forward(self, x):
            x = self.maxpool(self.first_conv(x))
            x = self.globalpool(self.features(x))
            return self.classifier(x.contiguous().view(-1, self.stage_out_channels[-1]))

    return ShuffleNetV1()


# Two units per stage keep every kind of unit: stage 2's first (ungrouped 1x1), the other
# stride-2 ones (average-pooled input concatenated) and stride-1 ones (residual).
V1_SHALLOW = dict(stages_repeats=(2, 2, 2))


@pytest.mark.parametrize("name,group,model_size", [("shufflenet_v1_g3", 3, "1.0x"),
                                                   ("shufflenet_v1_g8_x0_5", 8, "0.5x")])
def test_v1_logits_and_stage_maps_equal_the_authors_code(name, group, model_size):
    torch = reference.torch()
    torch.manual_seed(0)
    model = _authors_v1(torch, group, model_size, n_class=10, input_size=SIZE,
                        stage_repeats=V1_SHALLOW["stages_repeats"])
    reference.he_normal_convs(model)
    reference.randomize_batchnorm(model)
    model.eval()
    # The authors' widths are ours: the registry's rule reproduces their table.
    assert shufflenet.v1_channels(*V1_ROWS[name][:2]) == tuple(model.stage_out_channels[1:])
    images = random_images(2, SIZE)
    # Stage outputs: the max pool (stride 4), then the last unit of each stage.
    ends = np.cumsum(model.stage_repeats) - 1
    stages = [("stage1", model.maxpool)] + [(f"stage{s + 2}", model.features[int(i)])
                                            for s, i in enumerate(ends)]
    ref_logits, ref_maps = _run_torch(model, images, stages)
    params, state = nets.convert.from_torch(name, model.state_dict(), 10, **V1_SHALLOW)
    (logits, maps), _ = jitted_logits_and_features(name, 10, **V1_SHALLOW)(
        params, state, None, images)
    assert logits.shape == (2, 10) and np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
    assert set(maps) == set(ref_maps)
    for stage, ref_map in ref_maps.items():
        assert maps[stage].shape == ref_map.shape, stage
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4 * np.abs(ref_map).max(),
                                   rtol=0, err_msg=stage)

