"""NFNet against an independent re-derivation of the official DeepMind forward pass.

`_official_forward` below is written from ../shared/reference/nfnet_spec.md alone, in float64
NumPy, with nothing from `nets`: it walks a parameter tree in the official code's layout and
Haiku names ("NFNet/~/nf_block_3/~/conv1", ...), computing every block's constants itself. The
same tree, converted with `nets.convert.from_nfnet_official`, drives our model, so the converter
is checked too. The weights are random everywhere (skip gains, WS gains and biases, SE layers)
and half of every conv's output channels have N * var around the WS floor of 1e-4, so that the
floor's placement, the GELU approximation and the SE scale each move the outputs clearly.
"""

import functools
import math

import haiku as hk
import jax
import numpy as np
import pytest

import nets
from tests.helpers import random_images

# ----------------------------------------------------------------------------------------------
# The reference (spec section numbers in comments). Float64 throughout.

GELU_GAMMA = 1.7015043497085571  # §5: gamma of gelu, the NFNets' nonlinearity
ALPHA = 0.2  # §1
WS_FLOOR = 1e-4  # §4: a floor on N * var, not an eps added to it
GROUP_WIDTH, EXPANSION, SE_RATIO = 128, 0.5, 0.5  # §1, §6


def _act(x):
    """§5: jax.nn.gelu's default, the tanh approximation, times gamma."""
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)
    return GELU_GAMMA * 0.5 * x * (1.0 + np.tanh(inner))


def _standardise(w, gain):
    """§4: (W - mean_o) * gain_o / sqrt(max(N * var_o, 1e-4)), N = kh * kw * C_in / G."""
    fan_in = w.shape[0] * w.shape[1] * w.shape[2]
    centred = w - w.mean(axis=(0, 1, 2), dtype=np.float64)
    var = np.einsum("ijko,ijko->o", centred, centred) / fan_in
    centred *= gain / np.sqrt(np.maximum(fan_in * var, WS_FLOOR))
    return centred


def _same(n, k, s):
    """TF SAME: output size and (before, after) padding of one spatial axis."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return out, (total // 2, total - total // 2)


def _wsconv(x, p, stride=1, groups=1):
    """§4: standardised kernel, SAME padding, feature groups, then the bias. im2col + matmul."""
    kernel = _standardise(p["w"], p["gain"])
    kh, kw, cin_g, cout = kernel.shape
    b, h, w, _ = x.shape
    oh, pad_h = _same(h, kh, stride)
    ow, pad_w = _same(w, kw, stride)
    x = np.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    cout_g = cout // groups
    y = np.empty((b, oh, ow, cout))
    for g in range(groups):
        xg = x[..., g * cin_g:(g + 1) * cin_g]
        cols = np.stack([xg[:, i:i + stride * (oh - 1) + 1:stride,
                            j:j + stride * (ow - 1) + 1:stride]
                         for i in range(kh) for j in range(kw)], axis=3)  # b, oh, ow, taps, c
        kg = kernel[..., g * cout_g:(g + 1) * cout_g].reshape(kh * kw * cin_g, cout_g)
        y[..., g * cout_g:(g + 1) * cout_g] = (cols.reshape(b * oh * ow, -1) @ kg).reshape(
            b, oh, ow, cout_g)
    return y + p["bias"]


def _avg_pool_same(x):
    """hk.avg_pool(window 2, stride 2, SAME): padded positions are not counted."""
    _, h, w, _ = x.shape
    oh, (_, ph) = _same(h, 2, 2)
    ow, (_, pw) = _same(w, 2, 2)
    total = np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    ones = np.pad(np.ones((1, h, w, 1)), ((0, 0), (0, ph), (0, pw), (0, 0)))
    pool = lambda a: a.reshape(a.shape[0], oh, 2, ow, 2, a.shape[-1]).sum(axis=(2, 4))
    return pool(total) / pool(ones)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _official_forward(tree, depths, images):
    """The official NFNet in eval mode on an official-layout tree {module: {leaf: array}}.
    Returns (logits, [stage outputs], [every block's output])."""
    p = tree  # float32 arrays; every computation below promotes to float64
    x = np.asarray(images, np.float64)
    for i, stride in enumerate((2, 1, 1, 2)):  # §2: no activation after the last stem conv
        x = _wsconv(x, p[f"NFNet/~/stem_conv{i}"], stride)
        x = _act(x) if i < 3 else x
    stages, blocks, expected_std, index = [], [], 1.0, 0
    for depth, stage_stride in zip(depths, (1, 2, 2, 2)):
        for j in range(depth):
            name = "NFNet/~/nf_block" + (f"_{index}" if index else "")

            def block(module, name=name):
                return p[f"{name}/~/{module}"]

            out_ch = block("conv2")["w"].shape[-1]
            groups = int(out_ch * EXPANSION) // GROUP_WIDTH  # §3.2; width = 128 * groups
            stride = stage_stride if j == 0 else 1
            h = _act(x) / expected_std  # §3.3 (1): beta = 1 / expected std
            if j == 0:  # §3.3 (2): the transition block's shortcut
                shortcut = _wsconv(_avg_pool_same(h) if stride > 1 else h,
                                   block("conv_shortcut"))
            else:
                shortcut = x
            r = _wsconv(h, block("conv0"))
            r = _wsconv(_act(r), block("conv1"), stride, groups)
            r = _wsconv(_act(r), block("conv1b"), 1, groups)
            r = _wsconv(_act(r), block("conv2"))
            fc1, fc2 = block("squeeze_excite/~/linear"), block("squeeze_excite/~/linear_1")
            s = np.maximum(r.mean(axis=(1, 2)) @ fc1["w"] + fc1["b"], 0.0)
            r = 2.0 * _sigmoid(s @ fc2["w"] + fc2["b"])[:, None, None, :] * r  # §3.3 (4)
            x = ALPHA * (r * p[name]["skip_gain"]) + shortcut  # §3.3 (6), (7)
            blocks.append(x)
            expected_std = math.sqrt((1.0 if j == 0 else expected_std ** 2) + ALPHA ** 2)
            index += 1
        stages.append(x)
    x = _act(_wsconv(x, p["NFNet/~/final_conv"])).mean(axis=(1, 2))  # §7
    logits = x @ p["NFNet/~/linear"]["w"] + p["NFNet/~/linear"]["b"]
    return logits, stages, blocks


def _official_tree(widths, depths, num_classes, seed=0):
    """Random parameters in the official layout, shapes from §2, §3, §6, §7. Convs: half the
    output channels have N * var = 1, half log-uniform in [1e-5, 1e-3] (around the WS floor);
    every output channel gets a mean offset. Gains, biases, skip gains and SE weights random."""
    rng = np.random.default_rng(seed)
    tree = {}

    def conv(name, k, cin, cout, groups=1):
        fan_in = k * k * cin // groups
        target = np.where(rng.random(cout) < 0.5, 1.0, 10.0 ** rng.uniform(-5, -3, cout))
        std = np.sqrt(target / fan_in).astype(np.float32)
        w = rng.standard_normal((k, k, cin // groups, cout), np.float32)
        w = (w + rng.standard_normal(cout, np.float32)) * std
        tree[name] = {"w": w, "gain": rng.uniform(0.5, 1.5, cout),
                      "bias": 0.2 * rng.standard_normal(cout)}

    def linear(name, cin, cout, bias_std):
        tree[name] = {"w": rng.standard_normal((cin, cout), np.float32) / np.sqrt(cin),
                      "b": bias_std * rng.standard_normal(cout)}

    channels = 3
    for i, cout in enumerate((16, 32, 64, widths[0] // 2)):
        conv(f"NFNet/~/stem_conv{i}", 3, channels, cout)
        channels = cout
    index = 0
    for stage_width, depth in zip(widths, depths):
        width = int(stage_width * EXPANSION) // GROUP_WIDTH * GROUP_WIDTH
        for j in range(depth):
            name = "NFNet/~/nf_block" + (f"_{index}" if index else "")
            if j == 0:
                conv(f"{name}/~/conv_shortcut", 1, channels, stage_width)
            conv(f"{name}/~/conv0", 1, channels, width)
            conv(f"{name}/~/conv1", 3, width, width, width // GROUP_WIDTH)
            conv(f"{name}/~/conv1b", 3, width, width, width // GROUP_WIDTH)
            conv(f"{name}/~/conv2", 1, width, stage_width)
            hidden = max(1, int(stage_width * SE_RATIO))
            linear(f"{name}/~/squeeze_excite/~/linear", stage_width, hidden, 0.2)
            linear(f"{name}/~/squeeze_excite/~/linear_1", hidden, stage_width, 0.5)
            tree[name] = {"skip_gain": np.asarray(rng.uniform(0.5, 1.5))}
            channels, index = stage_width, index + 1
    conv("NFNet/~/final_conv", 1, channels, 2 * channels)
    linear("NFNet/~/linear", 2 * channels, num_classes, 0.1)
    return {m: {k: np.asarray(v, np.float32) for k, v in leaves.items()}
            for m, leaves in tree.items()}


# ----------------------------------------------------------------------------------------------
# F0 and F0+ (stage 1: 384 wide, bottleneck rounded down to 128; 3 and 8 groups; stem 192,
# final conv 4096; SE hidden 192 in stage 1, not the bottleneck's 128). The "+" variant keeps
# only two blocks in stage 2 (its scanned stage) and one elsewhere, for time.

CASES = {"nfnet_f0": ((256, 512, 1536, 1536), (1, 2, 6, 3), {}),
         "nfnet_f0plus": ((384, 768, 2048, 2048), (1, 2, 1, 1), {"depths": (1, 2, 1, 1)})}
# 56 px: the stride-2 convs and the shortcut pool see even (28, 14) and odd (7) inputs.
IMAGES = random_images(2, 56)
NUM_CLASSES = 10


@functools.cache
def _reference(name):
    widths, depths, _ = CASES[name]
    tree = _official_tree(widths, depths, NUM_CLASSES)
    return tree, _official_forward(tree, depths, IMAGES)


@functools.cache
def _ours(name):
    """(logits, stage maps, signal propagation) of our model on the converted official tree,
    from `nets.transformed`, `nets.transformed_features` and `NFNet.signal_propagation` under
    one jit: XLA shares the common work, so the three cost about one compile."""
    tree, _ = _reference(name)
    overrides = CASES[name][2]
    params, state = nets.convert.from_nfnet_official(name, tree, NUM_CLASSES, **overrides)
    assert state == {}
    model = nets.transformed(name, NUM_CLASSES, **overrides)
    features = nets.transformed_features(name, **overrides)
    spp = hk.transform(lambda x: nets.create(name, 0, **overrides).signal_propagation(x))

    def run(params, images):
        return (model.apply(params, state, None, images, is_training=False)[0],
                features.apply(params, state, None, images, is_training=False)[0],
                spp.apply(params, None, images))

    return jax.tree.map(np.asarray, jax.jit(run)(params, IMAGES))


def _relative_error(ours, ref):
    """max |ours - reference| / max |reference|: float32 against float64 it stays below 4e-6
    here; the faults the tests guard against move it by 3e-4 (exact GELU) or far more."""
    scale = np.abs(ref).max()
    assert scale > 0.05, scale  # a signal, not a vanished one
    return np.abs(np.asarray(ours, np.float64) - ref).max() / scale


TOLERANCE = 3e-5


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_equal_the_official_forward(name):
    _, (ref, _, _) = _reference(name)
    logits, _, _ = _ours(name)
    assert np.std(ref) > 0.1  # logits that tell the classes apart
    error = _relative_error(logits, ref)
    assert error < TOLERANCE, f"{name} logits: relative error {error:.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_stage_maps_equal_the_official_forward(name):
    _, (_, ref_stages, _) = _reference(name)
    _, ours, _ = _ours(name)
    assert [ours[f"stage{i + 1}"].shape for i in range(4)] == [r.shape for r in ref_stages]
    errors = {f"stage{i + 1}": _relative_error(ours[f"stage{i + 1}"], ref)
              for i, ref in enumerate(ref_stages)}
    assert max(errors.values()) < TOLERANCE, f"{name}: relative errors {errors}"


def test_signal_propagation_reports_every_blocks_output_variance():
    """The SPP values: per block, the channel mean of the block output's variance over batch and
    positions, computed here from the reference's block outputs on the same weights."""
    _, (_, _, blocks) = _reference("nfnet_f0")
    _, _, ours = _ours("nfnet_f0")
    expected = np.array([b.var(axis=(0, 1, 2)).mean() for b in blocks])
    assert ours.shape == (12,)
    assert expected.min() > 0.01 and np.ptp(expected) > 0.5 * expected.max()  # not all alike
    np.testing.assert_allclose(ours, expected, rtol=TOLERANCE)


# ----------------------------------------------------------------------------------------------
# Training mode. NFNet has no BatchNorm: with stochastic depth and dropout off, training mode
# computes the eval forward; each of them on makes it differ.

def test_training_mode_differs_from_eval_only_through_stochastic_depth_and_dropout():
    name, widths, depths = "nfnet_f0", (256, 256, 256, 256), (1, 2, 1, 2)  # small, 1 group
    base = dict(widths=widths, depths=depths)
    params, state = nets.convert.from_nfnet_official(
        name, _official_tree(widths, depths, NUM_CLASSES, seed=1), NUM_CLASSES, **base)
    images = random_images(8, 32, seed=1)
    settings = {"off": dict(stochastic_depth_rate=0.0, drop_rate=0.0),
                "stochastic depth": dict(stochastic_depth_rate=0.5, drop_rate=0.0),
                "dropout": dict(stochastic_depth_rate=0.0, drop_rate=0.5)}

    def run(params, images, key):
        evaluated = nets.transformed(name, NUM_CLASSES, **base).apply(
            params, state, None, images, is_training=False)[0]
        trained = {k: nets.transformed(name, NUM_CLASSES, **base, **v).apply(
            params, state, key, images, is_training=True)[0] for k, v in settings.items()}
        return evaluated, trained

    evaluated, trained = jax.jit(run)(params, images, jax.random.key(0))
    assert np.abs(evaluated).max() > 0.5
    np.testing.assert_allclose(trained["off"], evaluated, rtol=1e-6, atol=1e-6)
    for what in ("stochastic depth", "dropout"):
        change = float(np.abs(trained[what] - evaluated).max())
        assert change > 0.1 * np.abs(evaluated).max(), f"{what} on: largest change {change}"
