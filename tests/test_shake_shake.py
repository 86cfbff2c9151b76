"""Shake-Shake: the combination's forward and backward coefficients, the modes' draws, the paper's
CIFAR-10 parameter counts (also by hand), the two-path shortcut, a forward pass, and eval logits
and stage maps against the author's Lua network restated in PyTorch."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import shake_shake as ss
from tests import reference
from tests.helpers import (count, jitted_apply, jitted_logits_and_features, random_images,
                           random_variables)

# A cheap network with one block per stage (depth 6 * 1 + 2).
SMALL = dict(depth=8)


def test_forward_uses_alpha_and_backward_uses_beta():
    rng = np.random.RandomState(0)
    b1, b2, w = (rng.randn(2, 4, 4, 3).astype(np.float32) for _ in range(3))
    alpha = np.array([0.3, 0.7], np.float32).reshape(2, 1, 1, 1)
    beta = np.array([0.9, 0.2], np.float32).reshape(2, 1, 1, 1)

    def loss(b1, b2):
        return jnp.sum(ss.shake_shake(b1, b2, alpha, beta) * w)

    out = jax.jit(ss.shake_shake)(b1, b2, alpha, beta)
    np.testing.assert_allclose(out, alpha * b1 + (1 - alpha) * b2, rtol=1e-6)
    g1, g2 = jax.jit(jax.grad(loss, argnums=(0, 1)))(b1, b2)
    np.testing.assert_allclose(g1, beta * w, rtol=1e-6)
    np.testing.assert_allclose(g2, (1 - beta) * w, rtol=1e-6)
    # The coefficients are constants: no gradient reaches them.
    ga, gb = jax.grad(lambda a, b: jnp.sum(ss.shake_shake(b1, b2, a, b) * w), (0, 1))(
        alpha, beta)
    assert not np.any(ga) and not np.any(gb)


def test_combination_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ss.shake_shake(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 4, 4, 6)), 0.5, 0.5)
    with pytest.raises(ValueError, match="broadcast"):
        ss.shake_shake(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 4, 4, 3)), jnp.ones((3, 1, 1, 1)),
                       0.5)


def _coefficients(mode, batch, is_training, seed=0):
    f = hk.transform(lambda: ss.shake_coefficients(mode, batch, is_training))
    alpha, beta = f.apply({}, jax.random.key(seed) if is_training else None)
    return np.asarray(alpha), np.asarray(beta)


def test_shake_shake_image_draws_independent_uniforms_per_image():
    alpha, beta = _coefficients("shake_shake_image", 4096, True)
    assert alpha.shape == beta.shape == (4096, 1, 1, 1)
    for c in (alpha.ravel(), beta.ravel()):
        # Distinct draws (float32 has a few birthday collisions in 4096), within [0, 1).
        assert len(np.unique(c)) > 0.99 * c.size and np.all((c >= 0) & (c < 1))
        assert abs(c.mean() - 0.5) < 0.02 and abs(c.var() - 1 / 12) < 0.01  # U(0, 1)
    assert abs(np.corrcoef(alpha.ravel(), beta.ravel())[0, 1]) < 0.05
    again, _ = _coefficients("shake_shake_image", 4096, True, seed=1)
    assert not np.allclose(alpha, again)


def test_modes_batch_level_keep_and_even():
    alpha, beta = _coefficients("shake_shake_batch", 8, True)
    assert alpha.shape == (1, 1, 1, 1) and alpha != beta
    alpha, beta = _coefficients("shake_keep_image", 8, True)
    assert len(np.unique(alpha)) == 8 and np.array_equal(alpha, beta)
    alpha, beta = _coefficients("shake_even_image", 8, True)
    assert len(np.unique(alpha)) == 8 and np.all(beta == 0.5)
    alpha, beta = _coefficients("even_even", 8, True)
    assert np.all(alpha == 0.5) and np.all(beta == 0.5)


@pytest.mark.parametrize("mode", ["shake_shake_image", "shake_keep_batch", "even_even"])
def test_eval_coefficients_are_one_half_without_randomness(mode):
    alpha, beta = _coefficients(mode, 3, False)  # no rng given: none may be drawn
    assert np.all(alpha == 0.5) and np.all(beta == 0.5)


@pytest.mark.parametrize("mode", ["shake", "shake_shake", "shake_shake_pixel", "odd_even_image",
                                  "even_even_image", None])
def test_bad_modes_are_rejected(mode):
    with pytest.raises(ValueError, match="shake-shake mode"):
        ss.parse_mode(mode)
    with pytest.raises(ValueError, match="shake-shake mode"):
        hk.transform(lambda: nets.create("shake_shake_26_2x32d", 10, mode=mode)).init(None)


def _hand_count(width, num_classes, blocks=4):
    """(parameters, BN statistic elements) of the paper's CIFAR net by hand: 3x3 conv 16 + BN;
    per block two branches of two 3x3 convs + BN each; where the width changes two 1x1 convs
    to half the width + one BN; fc with bias. No conv biases."""
    params, bn, c_in = 3 * 3 * 3 * 16, [16], 16
    for c in (width, 2 * width, 4 * width):
        for _ in range(blocks):
            params += 2 * (9 * c_in * c + 9 * c * c)
            bn += [c] * 4
            if c_in != c:
                params += 2 * c_in * (c // 2)
                bn.append(c)
            c_in = c
    return params + 2 * sum(bn) + 4 * width * num_classes + num_classes, 2 * sum(bn)


@pytest.mark.parametrize("width,paper_millions", [(32, 2.9), (64, 11.7), (96, 26.2)])
def test_counts_equal_the_hand_count_and_round_to_the_papers_table(width, paper_millions):
    name = f"shake_shake_26_2x{width}d"
    params, state = nets.introspect.shapes(name, 10)
    expected, bn_stats = _hand_count(width, 10)
    assert nets.introspect.count_params(name, 10) == count(params) == expected
    assert count(state) == bn_stats
    assert round(count(params) / 1e6, 1) == paper_millions


def test_downsampling_shortcut_concatenates_a_plain_and_a_shifted_path():
    params, _ = nets.introspect.shapes("shake_shake_26_2x32d", 10)
    assert params["shake_shake/layer2_0/shortcut_conv1"]["w"].shape == (1, 1, 32, 32)
    assert params["shake_shake/layer2_0/shortcut_conv2"]["w"].shape == (1, 1, 32, 32)
    assert "shake_shake/layer2_1/shortcut_conv1" not in params  # identity within a stage

    def forward(images):
        seen = {}

        def record(next_fn, args, kwargs, context):
            if context.method_name == "__call__":
                seen[nets.registry.module_path(context.module.module_name)] = args[0]
            return next_fn(*args, **kwargs)

        with hk.intercept_methods(record):
            nets.create("shake_shake_26_2x32d", 10, **SMALL)(images, is_training=False)
        return seen

    f = hk.transform_with_state(lambda images, is_training: forward(images))
    images = random_images(1, 8)
    params, state = random_variables(f, images)
    seen, _ = jax.jit(f.apply, static_argnames="is_training")(params, state, None, images,
                                                              is_training=False)
    h = np.maximum(np.asarray(seen["layer2_0"]), 0)  # the shortcut reads ReLU(x)
    np.testing.assert_array_equal(seen["layer2_0.shortcut_conv1"], h[:, ::2, ::2])
    # Shifted one pixel right and down: path 2 sees the odd pixels, zeros on the top and left.
    expected = np.zeros_like(h[:, ::2, ::2])
    expected[:, 1:, 1:] = h[:, 1:-1:2, 1:-1:2]
    np.testing.assert_array_equal(seen["layer2_0.shortcut_conv2"], expected)
    # The first block changes the width 16 -> 32 at stride 1: path 1 sees every pixel.
    h1 = np.maximum(np.asarray(seen["layer1_0"]), 0)
    np.testing.assert_array_equal(seen["layer1_0.shortcut_conv1"], h1)


def test_training_shakes_and_eval_is_deterministic_at_one_half():
    images = random_images(2, 32)
    params, state = random_variables(nets.transformed("shake_shake_26_2x32d", 10, **SMALL),
                                      images)
    shake = jitted_apply("shake_shake_26_2x32d", 10, **SMALL)
    even = jitted_apply("shake_shake_26_2x32d", 10, mode="even_even", **SMALL)
    a, _ = shake(params, state, jax.random.key(1), images, is_training=True)
    b, _ = shake(params, state, jax.random.key(2), images, is_training=True)
    assert not np.allclose(a, b)
    evals = [shake(params, state, key, images, is_training=False)[0]
             for key in (None, jax.random.key(3))]
    np.testing.assert_array_equal(evals[0], evals[1])
    # Eval is the even network: both branches weighted 0.5.
    np.testing.assert_allclose(evals[0], even(params, state, None, images, is_training=False)[0],
                               rtol=1e-6, atol=1e-6)


def test_forward_on_cifar_images_and_features():
    name = "shake_shake_26_2x32d"
    images = random_images(2, 32)
    params, state = random_variables(nets.transformed(name, 10), images)
    logits, _ = jitted_apply(name, 10)(params, state, jax.random.key(1), images,
                                       is_training=True)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    g = nets.transformed_features(name)
    maps, _ = jax.eval_shape(lambda p, s, x: g.apply(p, s, None, x, is_training=False),
                             *nets.introspect.shapes(name, 0), images)
    assert {k: v.shape for k, v in maps.items()} == {
        "stage1": (2, 32, 32, 32), "stage2": (2, 16, 16, 64), "stage3": (2, 8, 8, 128)}
    assert nets.model_info(name).feature_strides == (1, 2, 4)


@pytest.mark.parametrize("overrides,images,match", [
    ({}, np.zeros((1, 4, 32, 32, 3), np.float32), "rank 5"),
    (dict(depth=25), random_images(1, 32), "6n \\+ 2"),
    (dict(width=33), random_images(1, 32), "even int"),
])
def test_bad_inputs_and_options_raise_clear_errors(overrides, images, match):
    f = nets.transformed("shake_shake_26_2x32d", 10, **overrides)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True), images)


# ----------------------------------------------------------------------------------------------
# Against the author's code (xgastaldi/shake-shake, Lua Torch), restated in PyTorch.


def _lua_reference(torch, depth, k, num_classes):
    """models/shakeshake.lua + models/shakeshakeblock.lua, module for module (Sequential,
    ConcatTable, JoinTable, SpatialZeroPadding(1, -1, 1, -1), SpatialAveragePooling(1, 1, s, s),
    MulConstant), evaluated: both branches end in MulConstant(0.5). Stage widths 16k, 32k,
    64k; `k` is the code's widenFactor (2x32d: k = 2)."""
    nn = torch.nn

    class MulConstant(nn.Module):
        def __init__(self, constant):
            super().__init__()
            self.constant = constant

        def forward(self, x):
            return x * self.constant

    class ConcatTable(nn.ModuleList):
        def forward(self, x):
            return [m(x) for m in self]

    class JoinTable(nn.Module):  # JoinTable(2) of Torch's 1-based NCHW: the channels
        def forward(self, xs):
            return torch.cat(xs, 1)

    def conv(n_in, n_out, kernel, stride, pad):  # cudnn >= 4: the code drops the biases
        return nn.Conv2d(n_in, n_out, kernel, stride, pad, bias=False)

    class ShakeShakeBlock(nn.Module):
        def __init__(self, n_in, n_out, stride):
            super().__init__()

            def branch():
                return nn.Sequential(nn.ReLU(), conv(n_in, n_out, 3, stride, 1),
                                     nn.BatchNorm2d(n_out), nn.ReLU(),
                                     conv(n_out, n_out, 3, 1, 1), nn.BatchNorm2d(n_out),
                                     MulConstant(0.5))

            self.net1, self.net2 = branch(), branch()
            if n_in == n_out:
                self.skip = nn.Sequential(nn.Identity())
            else:
                s1 = nn.Sequential(nn.AvgPool2d(1, stride), conv(n_in, n_out // 2, 1, 1, 0))
                # One pixel right and down: pad one on the left and top, drop the last column
                # and row.
                s2 = nn.Sequential(nn.ZeroPad2d((1, -1, 1, -1)), nn.AvgPool2d(1, stride),
                                   conv(n_in, n_out // 2, 1, 1, 0))
                self.skip = nn.Sequential(nn.ReLU(), ConcatTable([s1, s2]), JoinTable(),
                                          nn.BatchNorm2d(n_out))

        def forward(self, x):
            return self.skip(x) + self.net1(x) + self.net2(x)

    def layer(n_in, n_out, count, stride):
        return nn.Sequential(ShakeShakeBlock(n_in, n_out, stride),
                             *[ShakeShakeBlock(n_out, n_out, 1) for _ in range(count - 1)])

    n = (depth - 2) // 6
    return nn.Sequential(
        conv(3, 16, 3, 1, 1), nn.BatchNorm2d(16),
        layer(16, 16 * k, n, 1), layer(16 * k, 32 * k, n, 2), layer(32 * k, 64 * k, n, 2),
        nn.ReLU(), nn.AvgPool2d(8, 8), nn.Flatten(), nn.Linear(64 * k, num_classes))


def _variables_from_lua(model, blocks_per_stage):
    """Our (params, state) from the Lua-structured reference's modules, by position."""
    params, state = {}, {}

    def conv(ours, m):
        params[f"shake_shake/{ours}"] = {"w": m.weight.detach().numpy().transpose(2, 3, 1, 0)}

    def bn(ours, m):
        params[f"shake_shake/{ours}"] = {"scale": m.weight.detach().numpy(),
                                         "offset": m.bias.detach().numpy()}
        state[f"shake_shake/{ours}"] = {"mean": m.running_mean.numpy(),
                                        "var": m.running_var.numpy()}

    conv("conv1", model[0])
    bn("bn1", model[1])
    for s in range(3):
        for i in range(blocks_per_stage):
            block, ours = model[2 + s][i], f"layer{s + 1}_{i}"
            for b, net in ((1, block.net1), (2, block.net2)):
                conv(f"{ours}/branch{b}_conv1", net[1])
                bn(f"{ours}/branch{b}_bn1", net[2])
                conv(f"{ours}/branch{b}_conv2", net[4])
                bn(f"{ours}/branch{b}_bn2", net[5])
            if len(block.skip) > 1:
                conv(f"{ours}/shortcut_conv1", block.skip[1][0][1])
                conv(f"{ours}/shortcut_conv2", block.skip[1][1][2])
                bn(f"{ours}/shortcut_bn", block.skip[3])
    params["shake_shake/fc"] = {"w": model[8].weight.detach().numpy().T,
                                "b": model[8].bias.detach().numpy()}
    return params, state


def test_eval_logits_and_stage_maps_equal_the_authors_lua_network():
    torch = reference.torch()
    torch.manual_seed(0)
    name, depth, k = "shake_shake_26_2x32d", SMALL["depth"], 2
    model = _lua_reference(torch, depth, k, 10)
    reference.he_normal_convs(model)
    reference.randomize_batchnorm(model)
    model.eval()
    params, state = _variables_from_lua(model, (depth - 2) // 6)
    shapes = nets.introspect.shapes(name, 10, **SMALL)
    assert jax.tree.map(lambda a: a.shape, (params, state)) == jax.tree.map(
        lambda a: a.shape, shapes)

    images = random_images(2, 32)
    maps = {}
    hooks = [model[2 + s].register_forward_hook(
        lambda m, i, out, key=f"stage{s + 1}": maps.__setitem__(key, out.numpy()))
        for s in range(3)]
    with torch.no_grad():
        ref_logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    for hook in hooks:
        hook.remove()

    (logits, ours), _ = jitted_logits_and_features(name, 10, **SMALL)(params, state, None,
                                                                      images)
    assert np.abs(ref_logits).max() > 0.1  # a meaningful comparison, not of zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
    assert set(ours) == set(maps)
    for stage, ref_map in maps.items():
        ref_map = ref_map.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(ours[stage], ref_map, atol=1e-4 * np.abs(ref_map).max(),
                                   rtol=0, err_msg=stage)
