"""Pseudo-3D ResNet: the A/B/C block cycle (read from the computation itself), counts derived by
hand from the stage table, the two reference definitions' pooling and block semantics, clip
lengths, conversion from the PyTorch port's state-dict layout, and logits and stage maps against
both definitions (the port's and the Caffe prototxt's) restated in PyTorch."""

import functools

import haiku as hk
import jax
import numpy as np
import pytest

import nets
from nets import p3d
from tests import reference
from tests.helpers import count, jitted_apply, jitted_logits_and_features, random_variables

STAGES = {"p3d_resnet199": (3, 8, 36, 3), "p3d_resnet50": (3, 4, 6, 3)}
# A cheap network whose six pseudo-3D blocks cross both 3-D stage boundaries.
SMALL = dict(layers=(2, 2, 2, 1))


def _clip(frames=16, size=32, batch=1, seed=0):
    return np.random.RandomState(seed).randn(batch, frames, size, size, 3).astype(np.float32)


def _hand_counts(stage_blocks, num_classes):
    """(parameters, BN statistic elements) of a P3D ResNet from its stage table: 1x7x7 stem conv
    + BN; per pseudo-3D block 1x1 -> S 1x3x3 -> T 3x1x1 -> 1x1 (x4), each with BN; per 2-D block
    (last stage) 1x1 -> 3x3 -> 1x1; a 1x1 projection + BN on every stage's first block; fc."""
    conv, bn_channels, c_in = 7 * 7 * 3 * 64, [64], 64
    for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), stage_blocks)):
        out = 4 * planes
        middle = [1 * 3 * 3, 3 * 1 * 1] if s < 3 else [3 * 3]
        for i in range(blocks):
            conv += c_in * planes + sum(k * planes * planes for k in middle) + planes * out
            bn_channels += [planes] * (1 + len(middle)) + [out]
            if i == 0:
                conv += c_in * out
                bn_channels.append(out)
            c_in = out
    head = 2048 * num_classes + num_classes if num_classes else 0
    return conv + 2 * sum(bn_channels) + head, 2 * sum(bn_channels)


@pytest.mark.parametrize("name", list(STAGES))
def test_parameter_and_bn_statistic_counts_equal_the_hand_count(name):
    params, state = nets.introspect.shapes(name, 400)
    no_head, _ = nets.introspect.shapes(name, 0)
    expected, bn_stats = _hand_counts(STAGES[name], 400)
    assert nets.introspect.count_params(name, 400) == count(params) == expected
    assert count(no_head) == _hand_counts(STAGES[name], 0)[0]
    assert count(state) == bn_stats
    # The extra layers over the ResNet skeleton are the T convs: 199 = 152 + 47, 63 = 50 + 13.
    assert sum(k.endswith("/conv3") and v["w"].shape[:3] == (3, 1, 1)
               for k, v in params.items()) == sum(STAGES[name][:3])


def test_the_hand_count_gives_resnet152_plus_the_temporal_convs():
    # Without T convs a P3D-199 is ResNet-152 with a 400-way head (torchvision: 60,192,808).
    total, _ = _hand_counts((3, 8, 36, 3), 400)
    t_convs = sum(n * (3 * w * w + 2 * w) for n, w in ((3, 64), (8, 128), (36, 256)))
    assert total - t_convs == 60_192_808 - 600 * 2049


@pytest.mark.parametrize("name", list(STAGES))
def test_registered_block_kinds_cycle_through_all_3d_stages(name):
    kinds = hk.transform(lambda: nets.create(name).block_kinds()).apply({}, None)
    n_3d = sum(STAGES[name][:3])
    assert kinds == tuple("ABC"[i % 3] for i in range(n_3d)) + ("2d",) * STAGES[name][3]
    assert kinds[STAGES[name][0]] == "A"  # res3a continues the cycle, it does not restart it


@functools.cache
def _recorded(definition):
    """Eval forward of the SMALL network with every module call's (input, output) recorded."""

    def forward(clip):
        records = {}

        def record(next_fn, args, kwargs, context):
            out = next_fn(*args, **kwargs)
            if context.method_name == "__call__":
                records[nets.registry.module_path(context.module.module_name)] = (args[0], out)
            return out

        with hk.intercept_methods(record):
            model = nets.create("p3d_resnet50", 10, definition=definition, **SMALL)
            logits = model(clip, is_training=False)
        return logits, records

    f = hk.transform_with_state(lambda clip, is_training: forward(clip))
    clip = _clip()
    params, state = random_variables(f, clip)
    (logits, records), _ = jax.jit(f.apply, static_argnames="is_training")(
        params, state, None, clip, is_training=False)
    return logits, jax.tree.map(np.asarray, records)


def _kind_from_dataflow(records, block, definition):
    """Which unit a block computed, from what its T conv and its last 1x1 conv received."""
    relu = functools.partial(np.maximum, 0)
    s_in = records[f"{block}.conv2"][0]
    s = relu(records[f"{block}.bn2"][1])
    t_in, t = records[f"{block}.conv3"][0], records[f"{block}.bn3"][1]
    last_in = records[f"{block}.conv4"][0]
    caffe = definition == "caffe"
    if np.array_equal(t_in, s_in):  # parallel
        np.testing.assert_allclose(last_in, relu(s + t) if caffe else s + relu(t), atol=1e-5)
        return "B"
    np.testing.assert_allclose(t_in, s, atol=1e-6)  # serial: T reads S's output
    if np.allclose(last_in, relu(t), atol=1e-5):
        return "A"
    np.testing.assert_allclose(last_in, relu(0.5 * s + 0.5 * t) if caffe else s + relu(t),
                               atol=1e-5)
    return "C"


@pytest.mark.parametrize("definition", p3d.DEFINITIONS)
def test_blocks_compute_a_b_c_in_cycle_across_stage_boundaries(definition):
    logits, records = _recorded(definition)
    blocks = ["layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0", "layer3_1"]
    assert [_kind_from_dataflow(records, b, definition) for b in blocks] == list("ABCABC")
    kinds = hk.transform(lambda: nets.create("p3d_resnet50", **SMALL).block_kinds())
    assert kinds.apply({}, None) == tuple("ABCABC") + ("2d",)
    # The last stage is 2-D: time has been pooled away and no S/T convs exist there.
    assert records["layer4_0.conv_normal"][0].ndim == 4
    assert "layer4_0.conv2" not in records and "layer4_0.conv3" not in records
    assert logits.shape == (1, 10) and np.all(np.isfinite(logits))


def test_the_two_definitions_differ_only_in_computation():
    caffe, _ = _recorded("caffe")
    port, _ = _recorded("pytorch")
    assert not np.allclose(caffe, port)
    a = nets.introspect.shapes("p3d_resnet50", 400, **SMALL)
    b = nets.introspect.shapes("p3d_resnet50", 400, definition="pytorch", **SMALL)
    assert jax.tree.map(lambda s: s.shape, a) == jax.tree.map(lambda s: s.shape, b)


@pytest.mark.parametrize("definition,maxima", [
    # Caffe: windows start at 0, 2, 4 and the last one is clipped to rows 4-5.
    ("caffe", [2, 4, 5]),
    # The port pads by one: windows start at -1, 1, 3.
    ("pytorch", [1, 3, 5])])
def test_stem_pool_windows_follow_the_reference(definition, maxima):
    x = np.arange(4 * 6 * 6, dtype=np.float32).reshape(1, 4, 6, 6, 1)  # increasing everywhere
    y = np.asarray(p3d.max_pool(x, (2, 3, 3), (2, 2, 2), definition))
    assert y.shape == (1, 2, 3, 3, 1)
    # With increasing values a window's max is its last (frame, row, column).
    expected = x[0, [1, 3]][:, maxima][:, :, maxima, 0]
    np.testing.assert_array_equal(y[0, ..., 0], expected)


@pytest.mark.parametrize("definition,frames", [("caffe", 1), ("caffe", 16),
                                               ("pytorch", 16), ("pytorch", 31)])
def test_clip_lengths_that_pool_to_one_frame(definition, frames):
    assert p3d.frames_before_last_stage(frames, definition) == 1
    f = nets.transformed("p3d_resnet50", 400, definition=definition, **SMALL)
    clip = jax.ShapeDtypeStruct((1, frames, 32, 32, 3), np.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True), clip)
    logits, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                               params, state, clip)
    assert logits.shape == (1, 400)


def test_forward_on_a_small_clip_gives_finite_logits():
    name = "p3d_resnet50"
    clip = _clip()
    params, state = random_variables(nets.transformed(name, 400), clip)
    logits, _ = jitted_apply(name, 400)(params, state, None, clip, is_training=False)
    assert logits.shape == (1, 400) and np.all(np.isfinite(logits))


def test_features_are_3d_then_2d_at_strides_4_to_32():
    f = nets.transformed_features("p3d_resnet50")
    clip = nets.introspect.example_images("p3d_resnet50")
    assert clip.shape == (1, 16, 160, 160, 3)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True), clip)
    maps, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                             params, state, clip)
    assert {k: v.shape for k, v in maps.items()} == {
        "stage1": (1, 8, 40, 40, 256), "stage2": (1, 4, 20, 20, 512),
        "stage3": (1, 2, 10, 10, 1024), "stage4": (1, 5, 5, 2048)}
    assert nets.model_info("p3d_resnet50").feature_strides == (4, 8, 16, 32)


def _init_shapes(clip_shape, **overrides):
    f = nets.transformed("p3d_resnet50", 400, **{**SMALL, **overrides})
    clip = jax.ShapeDtypeStruct(clip_shape, np.float32)
    return jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True), clip)


@pytest.mark.parametrize("shape,overrides,match", [
    ((1, 32, 32, 3), {}, "rank 4"),
    ((1, 16, 32, 32, 1), {}, "3 channels"),
    ((1, 17, 32, 32, 3), {}, "1-16 frames"),
    ((1, 8, 32, 32, 3), dict(definition="pytorch"), "16-31 frames"),
    ((1, 16, 32, 32, 3), dict(definition="tf"), "definition must be"),
    ((1, 16, 32, 32, 3), dict(cycle="ABD"), "cycle must be"),
    ((1, 16, 32, 32, 3), dict(layers=(3, 4, 6)), "4 positive"),
])
def test_bad_inputs_and_options_raise_clear_errors(shape, overrides, match):
    with pytest.raises(ValueError, match=match):
        _init_shapes(shape, **overrides)


def _port_state_dict(stage_blocks, num_classes, seed=0):
    """Random tensors under the names and shapes of qijiezhao/pseudo-3d-pytorch's P3D state
    dict: Conv3d weights (O, I, t, h, w), Conv2d (O, I, h, w) in layer4, BatchNorm3d/2d."""
    shapes = {"conv1_custom.weight": (64, 3, 1, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean",
                                                       "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    c_in = 64
    for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), stage_blocks)):
        pointwise = (1, 1, 1) if s < 3 else (1, 1)
        for i in range(blocks):
            p = f"layer{s + 1}.{i}"
            shapes[f"{p}.conv1.weight"] = (planes, c_in, *pointwise)
            bn(f"{p}.bn1", planes)
            if s < 3:
                shapes[f"{p}.conv2.weight"] = (planes, planes, 1, 3, 3)
                bn(f"{p}.bn2", planes)
                shapes[f"{p}.conv3.weight"] = (planes, planes, 3, 1, 1)
                bn(f"{p}.bn3", planes)
            else:
                shapes[f"{p}.conv_normal.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn_normal", planes)
            shapes[f"{p}.conv4.weight"] = (4 * planes, planes, *pointwise)
            bn(f"{p}.bn4", 4 * planes)
            if i == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, c_in, *pointwise)
                bn(f"{p}.downsample.1", 4 * planes)
            c_in = 4 * planes
    shapes.update({"fc.weight": (num_classes, 2048), "fc.bias": (num_classes,)})
    rng = np.random.RandomState(seed)
    return {k: np.asarray(rng.randn(*s), np.float32) for k, s in shapes.items()}


def test_pytorch_port_state_dict_converts_by_renaming():
    sd = _port_state_dict((3, 4, 6, 3), 400)
    params, state = nets.convert.from_torch("p3d_resnet50", sd)
    np.testing.assert_array_equal(params["p3d/conv1_custom"]["w"],
                                  sd["conv1_custom.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(params["p3d/layer2_3/conv3"]["w"],
                                  sd["layer2.3.conv3.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(params["p3d/layer4_0/conv_normal"]["w"],
                                  sd["layer4.0.conv_normal.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["p3d/layer3_0/downsample_bn"]["scale"],
                                  sd["layer3.0.downsample.1.weight"])
    np.testing.assert_array_equal(state["p3d/layer1_2/bn3"]["var"],
                                  sd["layer1.2.bn3.running_var"])
    np.testing.assert_array_equal(params["p3d/fc"]["w"], sd["fc.weight"].T)


# ----------------------------------------------------------------------------------------------
# Against the authors' definitions, restated in PyTorch.


def _reference_p3d(torch, stage_blocks, num_classes, definition):
    """qijiezhao/pseudo-3d-pytorch's `p3d_model.py` (class P3D, Bottleneck numbered by a running
    block counter n_s, ST_A / ST_B / ST_C, 3-D up to depth_3d = sum(layers[:3]) blocks then 2-D,
    the time axis folded away by a view before layer4), in eval mode. With definition="caffe",
    the three places where the authors' prototxt (deploy_p3d_resnet_kinetics.prototxt) differs:
    Pooling3D with no padding and ceil rounding (clipped windows), P3D-B's ReLU after the sum
    (the T path's BN unrectified), P3D-C's Eltwise with coefficients 0.5, 0.5 and a ReLU.
    The port's AvgPool2d(5) is the global pool at 160 px (the prototxt's global_pooling): here
    an adaptive one, so that small clips work."""
    nn, relu = torch.nn, torch.nn.functional.relu
    caffe = definition == "caffe"
    depth_3d = sum(stage_blocks[:3])

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None, n_s=0):
            super().__init__()
            self.downsample, self.id = downsample, n_s
            self.ST = "ABC"[n_s % 3]
            stride_p = stride if downsample is None else (1, 2, 2)
            if n_s < depth_3d:
                conv, bn = nn.Conv3d, nn.BatchNorm3d
                stride_p = 1 if n_s == 0 else stride_p
            else:
                conv, bn = nn.Conv2d, nn.BatchNorm2d
                stride_p = 2 if n_s == depth_3d else 1
            self.conv1 = conv(inplanes, planes, kernel_size=1, bias=False, stride=stride_p)
            self.bn1 = bn(planes)
            if n_s < depth_3d:
                self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), 1, (0, 1, 1), bias=False)
                self.bn2 = nn.BatchNorm3d(planes)
                self.conv3 = nn.Conv3d(planes, planes, (3, 1, 1), 1, (1, 0, 0), bias=False)
                self.bn3 = nn.BatchNorm3d(planes)
            else:
                self.conv_normal = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                self.bn_normal = nn.BatchNorm2d(planes)
            self.conv4 = conv(planes, planes * 4, kernel_size=1, bias=False)
            self.bn4 = bn(planes * 4)

        def ST_A(self, x):
            x = relu(self.bn2(self.conv2(x)))
            return relu(self.bn3(self.conv3(x)))

        def ST_B(self, x):
            tmp_x = relu(self.bn2(self.conv2(x)))
            x = self.bn3(self.conv3(x))
            return relu(tmp_x + x) if caffe else tmp_x + relu(x)

        def ST_C(self, x):
            x = relu(self.bn2(self.conv2(x)))
            tmp_x = self.bn3(self.conv3(x))
            return relu(0.5 * x + 0.5 * tmp_x) if caffe else x + relu(tmp_x)

        def forward(self, x):
            residual = x
            out = relu(self.bn1(self.conv1(x)))
            if self.id < depth_3d:
                out = getattr(self, f"ST_{self.ST}")(out)
            else:
                out = relu(self.bn_normal(self.conv_normal(out)))
            out = self.bn4(self.conv4(out))
            if self.downsample is not None:
                residual = self.downsample(x)
            return relu(out + residual)

    class P3D(nn.Module):
        def __init__(self):
            super().__init__()
            self.inplanes, self.cnt = 64, 0
            self.conv1_custom = nn.Conv3d(3, 64, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False)
            self.bn1 = nn.BatchNorm3d(64)
            if caffe:  # Pooling3D: pad 0, ceil
                self.maxpool = nn.MaxPool3d((2, 3, 3), 2, 0, ceil_mode=True)
                self.maxpool_2 = nn.MaxPool3d((2, 1, 1), (2, 1, 1), 0, ceil_mode=True)
            else:
                self.maxpool = nn.MaxPool3d((2, 3, 3), 2, (0, 1, 1))
                self.maxpool_2 = nn.MaxPool3d((2, 1, 1), (2, 1, 1), 0)
            self.layer1 = self._make_layer(64, stage_blocks[0])
            self.layer2 = self._make_layer(128, stage_blocks[1], stride=2)
            self.layer3 = self._make_layer(256, stage_blocks[2], stride=2)
            self.layer4 = self._make_layer(512, stage_blocks[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(2048, num_classes)

        def _make_layer(self, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * 4:
                if self.cnt < depth_3d:
                    stride_p = 1 if self.cnt == 0 else (1, 2, 2)
                    downsample = nn.Sequential(
                        nn.Conv3d(self.inplanes, planes * 4, 1, stride_p, bias=False),
                        nn.BatchNorm3d(planes * 4))
                else:
                    downsample = nn.Sequential(
                        nn.Conv2d(self.inplanes, planes * 4, 1, 2, bias=False),
                        nn.BatchNorm2d(planes * 4))
            units = [Bottleneck(self.inplanes, planes, stride, downsample, n_s=self.cnt)]
            self.cnt += 1
            self.inplanes = planes * 4
            for _ in range(1, blocks):
                units.append(Bottleneck(self.inplanes, planes, n_s=self.cnt))
                self.cnt += 1
            return nn.Sequential(*units)

        def forward(self, x):
            """(logits, {"res2": ..., "res5": ...}: each stage's output, before its pool)."""
            stages = {}
            x = self.maxpool(relu(self.bn1(self.conv1_custom(x))))
            x = stages["res2"] = self.layer1(x)
            x = stages["res3"] = self.layer2(self.maxpool_2(x))
            x = stages["res4"] = self.layer3(self.maxpool_2(x))
            x = self.maxpool_2(x)
            sizes = x.size()
            x = x.view(-1, sizes[1], sizes[3], sizes[4])
            x = stages["res5"] = self.layer4(x)
            x = self.avgpool(x).view(-1, 2048)
            return self.fc(x), stages

    return P3D()


@pytest.mark.parametrize("definition,frames", [("pytorch", 16), ("caffe", 12)])
def test_logits_and_stage_maps_equal_the_authors_definition(definition, frames):
    # 12 frames under Caffe go 6, 3, 2 (ceil: a clipped last window), 1; at 48 px the stem
    # pool's last window is clipped, and res4's odd 3 x 3 map goes to res5's 2 x 2.
    torch = reference.torch()
    torch.manual_seed(0)
    model = _reference_p3d(torch, SMALL["layers"], 10, definition)
    reference.he_normal_convs(model)
    reference.randomize_batchnorm(model)
    model.eval()
    overrides = dict(definition=definition, **SMALL)
    params, state = nets.convert.from_torch("p3d_resnet50", model.state_dict(), 10, **overrides)
    clip = _clip(frames, 48)
    with torch.no_grad():
        ref_logits, ref_maps = model(torch.from_numpy(clip.transpose(0, 4, 1, 2, 3)))
    ref_logits = ref_logits.numpy()
    (logits, maps), _ = jitted_logits_and_features("p3d_resnet50", 10, **overrides)(
        params, state, None, clip)
    assert np.abs(ref_logits).max() > 0.1  # a meaningful comparison, not of zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
    frames_per_stage = (6, 3, 2) if definition == "caffe" else (8, 4, 2)
    assert {k: m.shape[1:-1] for k, m in maps.items()} == {
        "stage1": (frames_per_stage[0], 12, 12), "stage2": (frames_per_stage[1], 6, 6),
        "stage3": (frames_per_stage[2], 3, 3), "stage4": (2, 2)}
    for s, res in enumerate(("res2", "res3", "res4", "res5")):
        ref_map = ref_maps[res].numpy()
        ref_map = np.moveaxis(ref_map, 1, -1)  # NC(T)HW -> N(T)HWC
        np.testing.assert_allclose(maps[f"stage{s + 1}"], ref_map,
                                   atol=1e-4 * np.abs(ref_map).max(), rtol=0, err_msg=res)
