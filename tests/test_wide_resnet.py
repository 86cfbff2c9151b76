"""Wide ResNets (WRN-n-k): counts by hand against the paper's table, outputs and stage maps
against the authors' PyTorch code (pytorch/resnet.py, restated as modules) on converted weights,
dropout between the two convs in training only, init, bad options."""

import haiku as hk
import jax
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import (count, jitted_apply, jitted_logits_and_features, random_images,
                           random_variables)

WRNS = nets.list_models("wrn_*")
# A cheap network for the dropout and init checks: one block per group, widths 16, 32, 64.
TINY = dict(depth=10, widen_factor=1)


def test_the_registered_variants():
    assert WRNS == ["wrn_16_4", "wrn_16_8", "wrn_28_10", "wrn_40_4"]
    for name in WRNS:
        info = nets.model_info(name)
        depth, k = map(int, name.split("_")[1:])
        assert info.config == dict(depth=depth, widen_factor=k)
        assert (info.family, info.feature_strides, info.train_size, info.test_size) == (
            "wide_resnet", (1, 2, 4), 32, 32)
        assert nets.default_num_classes(name) == 10  # CIFAR-10
        assert info.preprocessing.crop_fraction == 1.0  # 32 px images evaluated whole
        np.testing.assert_allclose(np.array(info.preprocessing.mean) * 255, (125.3, 123.0, 113.9))


def _hand_count(depth, k, num_classes):
    """(parameters, BN statistic elements) by the paper's design: a 3x3 conv 3 -> 16; per block
    BN(c_in), 3x3 conv c_in -> c, BN(c), 3x3 conv c -> c, and a 1x1 conv c_in -> c where the
    width changes; the final BN and the fc with bias. No conv biases."""
    params, bn, c_in = 9 * 3 * 16, [], 16
    for c in (16 * k, 32 * k, 64 * k):
        for _ in range((depth - 4) // 6):
            params += 9 * c_in * c + 9 * c * c + (c_in * c if c_in != c else 0)
            bn += [c_in, c]
            c_in = c
    bn.append(c_in)
    return params + 2 * sum(bn) + c_in * num_classes + num_classes, 2 * sum(bn)


@pytest.mark.parametrize("name,paper_millions", [
    ("wrn_16_4", 2.7), ("wrn_16_8", 11.0), ("wrn_28_10", 36.5), ("wrn_40_4", 8.9)])
def test_counts_equal_the_hand_count_and_round_to_the_papers_table(name, paper_millions):
    """The paper's Tables 4-5 (CIFAR-10) in millions; WRN-28-10 is the 36,479,194 commonly
    quoted from the authors' code."""
    info = nets.model_info(name)
    params, state = nets.introspect.shapes(name)  # the default head: 10 classes
    expected, bn_stats = _hand_count(info.config["depth"], info.config["widen_factor"], 10)
    assert count(params) == expected and count(state) == bn_stats
    assert round(count(params) / 1e6, 1) == paper_millions
    if name == "wrn_28_10":
        assert count(params) == 36_479_194
        assert nets.introspect.count_params(name, 100) == _hand_count(28, 10, 100)[0]


# ----------------------------------------------------------------------------------------------
# Against the authors' PyTorch code


def _official_reference(torch, depth, k, num_classes):
    """pytorch/resnet.py's functional network as modules named like its parameters
    ("group0.block0.conv0", "bn", "fc"): BN-ReLU, conv0, BN-ReLU, conv1; `convdim` on the first
    BN-ReLU's output where the width changes; final BN-ReLU, 8x8 average pool, fc."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, ni, no, stride):
            super().__init__()
            self.stride = stride
            self.bn0, self.bn1 = nn.BatchNorm2d(ni), nn.BatchNorm2d(no)
            self.conv0 = nn.Conv2d(ni, no, 3, stride, 1, bias=False)
            self.conv1 = nn.Conv2d(no, no, 3, 1, 1, bias=False)
            self.convdim = nn.Conv2d(ni, no, 1, stride, 0, bias=False) if ni != no else None

        def forward(self, x):
            o1 = F.relu(self.bn0(x))
            z = self.conv1(F.relu(self.bn1(self.conv0(o1))))
            return z + (self.convdim(o1) if self.convdim is not None else x)

    class WRN(nn.Module):
        def __init__(self):
            super().__init__()
            n, widths = (depth - 4) // 6, [16 * k, 32 * k, 64 * k]
            self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            ins = [16] + widths[:2]
            for g in range(3):
                setattr(self, f"group{g}", nn.ModuleDict({
                    f"block{i}": Block(ins[g] if i == 0 else widths[g], widths[g],
                                       (1 if g == 0 else 2) if i == 0 else 1)
                    for i in range(n)}))
            self.bn, self.fc = nn.BatchNorm2d(widths[2]), nn.Linear(widths[2], num_classes)

        def forward(self, x):
            maps, x = {}, self.conv0(x)
            for g in range(3):
                for block in getattr(self, f"group{g}").values():
                    x = block(x)
                maps[f"stage{g + 1}"] = x
            o = F.relu(self.bn(x))
            maps["stage3"] = o
            return self.fc(F.avg_pool2d(o, 8, 1, 0).flatten(1)), maps

    return WRN()


def test_eval_logits_and_stage_maps_equal_the_authors_pytorch_network():
    torch = reference.torch()
    torch.manual_seed(0)
    name = "wrn_16_4"  # two blocks per group: a 1x1 shortcut conv and an identity in each
    model = _official_reference(torch, 16, 4, 10)
    reference.he_normal_convs(model)
    reference.randomize_batchnorm(model)
    model.eval()
    params, state = nets.convert.from_torch(name, model.state_dict())
    assert set(params) >= {"wide_resnet/group1_block0/convdim", "wide_resnet/fc"}
    assert "wide_resnet/group1_block1/convdim" not in params

    images = random_images(2, 32)
    with torch.no_grad():
        ref_logits, ref_maps = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    (logits, maps), _ = jitted_logits_and_features(name, 10)(params, state, None, images)
    ref_logits = ref_logits.numpy()
    assert np.abs(ref_logits).max() > 0.1  # a meaningful comparison, not of zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
    assert {k: v.shape for k, v in maps.items()} == {
        "stage1": (2, 32, 32, 64), "stage2": (2, 16, 16, 128), "stage3": (2, 8, 8, 256)}
    for stage, ref_map in ref_maps.items():
        ref_map = ref_map.numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4 * np.abs(ref_map).max(),
                                   rtol=0, err_msg=stage)


# ----------------------------------------------------------------------------------------------
# Dropout, init, options


def _conv1_inputs(overrides, params, state, rng, images, is_training):
    """The input of every block's second conv (conv1), recorded from one forward."""
    def forward(images):
        seen = {}

        def record(next_fn, args, kwargs, context):
            if context.method_name == "__call__" and context.module.module_name.endswith(
                    "/conv1"):
                seen[context.module.module_name] = args[0]
            return next_fn(*args, **kwargs)

        with hk.intercept_methods(record):
            nets.create("wrn_16_4", 10, **overrides)(images, is_training=is_training)
        return seen

    return jax.jit(hk.transform_with_state(forward).apply)(params, state, rng, images)[0]


def test_dropout_sits_between_the_two_convs_and_acts_only_in_training():
    rate, images = 0.3, random_images(2, 16)
    params, state = random_variables(nets.transformed("wrn_16_4", 10, **TINY), images)
    plain = _conv1_inputs(TINY, params, state, None, images, True)
    dropped = _conv1_inputs({**TINY, "dropout_rate": rate}, params, state, jax.random.key(0),
                            images, True)
    assert set(plain) == set(dropped) and len(plain) == 3
    # The first block's conv1 input: before it nothing is dropped (its BN statistics are the
    # plain network's), so it is the plain BN-ReLU output, zeroed or scaled by 1 / (1 - rate).
    first = "wide_resnet/group0_block0/conv1"
    x, ref = np.asarray(dropped.pop(first)), np.asarray(plain[first])
    kept = x != 0
    assert 0.6 < kept.sum() / (ref != 0).sum() < 0.8  # of the nonzero (ReLU) inputs
    np.testing.assert_allclose(x[kept], ref[kept] / (1 - rate), rtol=1e-5, atol=1e-6)
    for module, x in dropped.items():  # later blocks: dropout's zeros on top of ReLU's
        assert np.mean(np.asarray(x) == 0) > np.mean(np.asarray(plain[module]) == 0) + 0.1
    # Training draws a new mask per key; in eval mode the network is the plain one, operation
    # for operation (and needs no rng).
    train = jitted_apply("wrn_16_4", 10, dropout_rate=rate, **TINY)
    a, _ = train(params, state, jax.random.key(1), images, is_training=True)
    b, _ = train(params, state, jax.random.key(2), images, is_training=True)
    assert not np.allclose(a, b)

    def eval_jaxpr(**overrides):
        f = nets.transformed("wrn_16_4", 10, **TINY, **overrides)
        return str(jax.make_jaxpr(lambda p, s, x: f.apply(p, s, None, x, is_training=False))(
            params, state, images))

    assert eval_jaxpr(dropout_rate=rate) == eval_jaxpr()


def test_init_is_the_lua_codes_he_normal_over_fan_out():
    f = nets.transformed("wrn_16_4", 10, **TINY)
    fast_compile = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    params, state = jax.jit(f.init, static_argnames="is_training", compiler_options=fast_compile)(
        jax.random.key(0), random_images(1, 16), is_training=True)
    w = np.asarray(params["wide_resnet/group2_block0/conv1"]["w"])  # 3x3, 64 -> 64
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 64)), rtol=0.05)
    w = np.asarray(params["wide_resnet/group2_block0/conv0"]["w"])  # 3x3, 32 -> 64: fan-out 576
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 64)), rtol=0.05)
    assert not any("b" in v for k, v in params.items() if "conv" in k)  # no conv biases
    fc = params["wide_resnet/fc"]
    assert 0.9 / 8 < np.abs(fc["w"]).max() <= 1 / 8  # Torch's nn.Linear: U(+-1/sqrt(64))
    np.testing.assert_array_equal(fc["b"], 0)


@pytest.mark.parametrize("overrides,match", [
    (dict(depth=27), "6N \\+ 4"), (dict(depth=4), "6N \\+ 4"),
    (dict(widen_factor=0), "widen_factor"), (dict(widen_factor=2.5), "widen_factor"),
    (dict(dropout_rate=1.0), "dropout_rate"),
])
def test_bad_options_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        nets.introspect.shapes("wrn_16_4", **overrides)


def test_bad_images_raise_clear_errors():
    f = nets.transformed("wrn_16_4")
    with pytest.raises(ValueError, match="wide_resnet expects .* 3 channels; got shape"):
        jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                       jax.ShapeDtypeStruct((1, 3, 32, 32), np.float32))
