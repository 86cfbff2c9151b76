"""Deformable convolution v1/v2: against the regular conv, a NumPy port of torchvision's sampling
rule, integer shifts, the DCNv2 init, and finite-difference gradients."""

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nets import deformable, layers

# Compiled once per static configuration: eager dispatch compiles every primitive on its own.
_STATIC = ("stride", "padding", "dilation", "groups", "deformable_groups")
deform_conv = jax.jit(deformable.deform_conv, static_argnames=_STATIC)
conv = jax.jit(layers.conv, static_argnames=("stride", "padding", "dilation", "groups"))


def _kernel(rng, shape):
    """He-scaled weights, so that outputs are O(1) and 1e-5 is a float32-rounding tolerance."""
    return (rng.randn(*shape) * math.sqrt(2 / (shape[0] * shape[1] * shape[3]))).astype(
        np.float32)


# (kernel, stride, padding, dilation, groups, deformable_groups)
CONFIGS = [
    ((3, 3), 1, "torch", 1, 1, 1),
    ((3, 3), 2, "torch", 1, 1, 1),
    ((3, 3), 1, "torch", 2, 1, 1),
    ((3, 3), 2, "same", 1, 1, 1),
    ((1, 1), 2, 0, 1, 1, 1),
    ((3, 3), 1, 0, 1, 2, 2),
    ((2, 3), (2, 1), ((1, 0), (2, 1)), (1, 2), 4, 4),
]


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups,dg", CONFIGS)
def test_zero_offsets_and_unit_mask_are_the_regular_conv(kernel, stride, padding, dilation,
                                                         groups, dg):
    rng = np.random.RandomState(0)
    x = rng.randn(2, 9, 11, 8).astype(np.float32)
    w = _kernel(rng, (*kernel, 8 // groups, 12))
    ho, wo = deformable.output_size((9, 11), kernel, stride, padding, dilation)
    taps = kernel[0] * kernel[1]
    offsets = np.zeros((2, ho, wo, 2 * dg * taps), np.float32)
    mask = np.ones((2, ho, wo, dg * taps), np.float32)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    expected = conv(x, w, **options)
    for m in (mask, None):  # v2 with a unit mask and v1
        y = deform_conv(x, w, offsets, m, deformable_groups=dg, **options)
        assert y.shape == expected.shape == (2, ho, wo, 12)
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)


def _torchvision_bilinear(img, h, w):
    """torchvision's csrc/ops/cpu/deform_conv2d_kernel.cpp `bilinear_interpolate` on one
    channel plane (H, W): 0 beyond (-1, H) x (-1, W), otherwise only in-image corners."""
    height, width = img.shape
    if h <= -1 or height <= h or w <= -1 or width <= w:
        return 0.0
    h_low, w_low = math.floor(h), math.floor(w)
    h_high, w_high = h_low + 1, w_low + 1
    lh, lw = h - h_low, w - w_low
    hh, hw = 1 - lh, 1 - lw
    v1 = img[h_low, w_low] if h_low >= 0 and w_low >= 0 else 0.0
    v2 = img[h_low, w_high] if h_low >= 0 and w_high <= width - 1 else 0.0
    v3 = img[h_high, w_low] if h_high <= height - 1 and w_low >= 0 else 0.0
    v4 = img[h_high, w_high] if h_high <= height - 1 and w_high <= width - 1 else 0.0
    return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4


def _torchvision_deform_conv(x, weight, offset, mask, stride, pad, dilation, groups):
    """torchvision.ops.deform_conv2d in its own layouts (x NCHW, weight OIHW, offset
    (B, 2*dg*kh*kw, Ho, Wo) as [dg][kh*kw][(dy, dx)], mask (B, dg*kh*kw, Ho, Wo) or None),
    loop by loop in float64."""
    b, c, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    taps = kh * kw
    ho, wo = offset.shape[2:]
    dg = offset.shape[1] // (2 * taps)
    cols = np.zeros((b, c, kh, kw, ho, wo))
    for n, ch, i, j, oy, ox in np.ndindex(b, c, kh, kw, ho, wo):
        g, t = ch // (c // dg), i * kw + j
        dy, dx = offset[n, g * 2 * taps + 2 * t, oy, ox], offset[n, g * 2 * taps + 2 * t + 1,
                                                                   oy, ox]
        m = 1.0 if mask is None else mask[n, g * taps + t, oy, ox]
        sy = oy * stride[0] - pad[0] + i * dilation[0] + dy
        sx = ox * stride[1] - pad[1] + j * dilation[1] + dx
        cols[n, ch, i, j, oy, ox] = m * _torchvision_bilinear(x[n, ch], sy, sx)
    out = np.zeros((b, c_out, ho, wo))
    per_out = c_out // groups
    for g in range(groups):
        cin = slice(g * c_per_group, (g + 1) * c_per_group)
        cout = slice(g * per_out, (g + 1) * per_out)
        out[:, cout] = np.einsum("bcijhw,ocij->bohw", cols[:, cin], weight[cout])
    return out


# (kernel, stride, padding, dilation, groups, deformable_groups, modulated)
RANDOM_CASES = [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True),
    ((3, 3), (2, 2), (1, 1), (1, 1), 2, 2, True),
    ((3, 3), (1, 1), (2, 2), (2, 2), 1, 4, False),
    ((2, 3), (2, 1), (0, 1), (1, 1), 1, 2, True),
]


@pytest.mark.parametrize("kernel,stride,pad,dilation,groups,dg,modulated", RANDOM_CASES)
def test_random_offsets_and_masks_match_torchvisions_sampling(kernel, stride, pad, dilation,
                                                              groups, dg, modulated):
    rng = np.random.RandomState(1)
    b, c, h, w = 2, 4, 6, 7
    x = rng.randn(b, c, h, w)
    weight = rng.randn(6, c // groups, *kernel) * 0.3
    ho = (h + 2 * pad[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * pad[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    taps = kernel[0] * kernel[1]
    # Fractional offsets up to 3 px, so many samples straddle or leave the image; a third of
    # them rounded to integers, which puts samples exactly on -1, 0, H-1 and H.
    offset = rng.uniform(-3, 3, (b, 2 * dg * taps, ho, wo))
    offset = np.where(rng.rand(*offset.shape) < 1 / 3, np.round(offset), offset)
    mask = rng.uniform(0, 1, (b, dg * taps, ho, wo)) if modulated else None
    expected = _torchvision_deform_conv(x, weight, offset, mask, stride, pad, dilation, groups)

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    y = deform_conv(
        f32(x.transpose(0, 2, 3, 1)), f32(weight.transpose(2, 3, 1, 0)),
        deformable.offsets_from_torch(f32(offset)),
        None if mask is None else deformable.mask_from_torch(f32(mask)),
        stride=stride, padding=tuple((p, p) for p in pad), dilation=dilation, groups=groups,
        deformable_groups=dg)
    assert np.isclose(offset, np.round(offset)).any() and (np.abs(offset) > 2).any()
    np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shift", [(0, 1), (-1, 0), (2, -1)])
def test_integer_offsets_sample_the_shifted_image(shift, stride):
    """An offset (dy, dx) everywhere reads x at p + (dy, dx): the regular conv with its window
    origins moved, i.e. with padding (p - dy, p + dy), (p - dx, p + dx), zeros coming in."""
    rng = np.random.RandomState(2)
    x = rng.randn(1, 8, 9, 4).astype(np.float32)
    w = _kernel(rng, (3, 3, 4, 5))
    ho, wo = deformable.output_size((8, 9), (3, 3), stride, 2)
    offsets = np.tile(np.asarray(shift, np.float32), (1, ho, wo, 9))
    y = deform_conv(x, w, offsets, stride=stride, padding=2)
    dy, dx = shift
    shifted = conv(x, w, stride=stride, padding=((2 - dy, 2 + dy), (2 - dx, 2 + dx)))
    np.testing.assert_allclose(y, shifted, rtol=0, atol=1e-5)
    assert not np.allclose(y, conv(x, w, stride=stride, padding=2), atol=1e-2)


def _module(modulated, **options):
    def forward(x):
        return deformable.DeformableConv(6, 3, modulated=modulated, with_bias=True,
                                         name="dcn", **options)(x)
    return hk.without_apply_rng(hk.transform(forward))


@pytest.mark.parametrize("modulated,scale", [(True, 0.5), (False, 1.0)])
def test_module_at_init_is_the_scaled_regular_conv_and_offsets_learn(modulated, scale):
    rng = np.random.RandomState(3)
    x = rng.randn(2, 10, 10, 4).astype(np.float32)
    f = _module(modulated, stride=2, groups=2, deformable_groups=2)
    params = jax.jit(f.init)(jax.random.key(0), x)
    predicted = 3 * 2 * 9 if modulated else 2 * 2 * 9
    assert jax.tree.map(jnp.shape, params) == {
        "dcn": {"w": (3, 3, 2, 6), "b": (6,)},
        "dcn/conv_offset": {"w": (3, 3, 4, predicted), "b": (predicted,)}}
    assert not np.any(params["dcn/conv_offset"]["w"]) and not np.any(params["dcn/conv_offset"]["b"])
    bias = rng.randn(6).astype(np.float32)
    params = {**params, "dcn": {**params["dcn"], "b": bias}}
    regular = conv(x, params["dcn"]["w"], stride=2, groups=2)
    apply = jax.jit(f.apply)
    y = apply(params, x)
    np.testing.assert_allclose(y, scale * regular + bias, rtol=0, atol=1e-5)

    target = rng.randn(*y.shape).astype(np.float32)
    loss = jax.jit(lambda p: jnp.sum(f.apply(p, x) * target))
    grads = jax.grad(loss)(params)
    assert np.abs(grads["dcn/conv_offset"]["w"]).max() > 1e-3
    assert np.abs(grads["dcn/conv_offset"]["b"]).max() > 1e-3
    # A small step of the offset conv alone along its gradient lowers the loss: offsets learn.
    stepped = {**params, "dcn/conv_offset": jax.tree.map(
        lambda p, g: p - 1e-3 * g, params["dcn/conv_offset"], grads["dcn/conv_offset"])}
    assert loss(stepped) < loss(params)


def test_module_computes_in_bfloat16_with_float32_parameters():
    rng = np.random.RandomState(4)
    x = rng.randn(1, 8, 8, 4).astype(np.float32)
    f = _module(True)
    params = jax.jit(f.init)(jax.random.key(0), x)
    offset_params = {"w": rng.randn(3, 3, 4, 27).astype(np.float32) * 0.3,
                     "b": rng.randn(27).astype(np.float32)}
    params = {**params, "dcn/conv_offset": offset_params}
    apply = jax.jit(f.apply)
    y32 = apply(params, x)
    y16 = apply(params, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert jax.tree.leaves(jax.tree.map(lambda p: p.dtype, params)) == [jnp.float32] * 4
    np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=0,
                               atol=0.05 * float(np.abs(y32).max()))


def test_gradients_match_finite_differences():
    rng = np.random.RandomState(5)
    with jax.enable_x64(True):
        x = rng.randn(1, 5, 6, 2)
        w = rng.randn(3, 3, 2, 3) * 0.3
        # Fractional parts kept away from integers: bilinear sampling has kinks there.
        offsets = rng.randint(-2, 2, (1, 3, 3, 18)) + rng.uniform(0.2, 0.8, (1, 3, 3, 18))
        mask = rng.uniform(0.2, 0.9, (1, 3, 3, 9))

        def f(x, w, offsets, mask):
            return deform_conv(x, w, offsets, mask, stride=2, padding=1)

        grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3)))(
            x, w, offsets, mask)
        assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads)
        check_grads(jax.jit(f), (x, w, offsets, mask), order=1, modes=["rev"])


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((1, 6, 6, 4))
    w = jnp.zeros((3, 3, 4, 8))
    offsets, mask = jnp.zeros((1, 6, 6, 18)), jnp.zeros((1, 6, 6, 9))
    with pytest.raises(ValueError, match="rank 3"):
        deform_conv(x[0], w, offsets, mask)
    with pytest.raises(ValueError, match="with 4 channels"):
        deform_conv(jnp.zeros((1, 6, 6, 3)), w, offsets, mask)
    with pytest.raises(ValueError, match="offsets must have shape"):
        deform_conv(x, w, offsets[..., :9], mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        deform_conv(x, w, offsets, mask[:, :3])
    with pytest.raises(ValueError, match="deformable_groups=3"):
        deform_conv(x, w, jnp.zeros((1, 6, 6, 54)), deformable_groups=3)
    with pytest.raises(ValueError, match="stride"):
        deform_conv(x, w, offsets, mask, stride=0)
    with pytest.raises(ValueError, match="groups=3"):
        _module(True, groups=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="modulated"):
        hk.transform(lambda x: deformable.DeformableConv(8, 3, modulated="v2")(x)).init(
            jax.random.key(0), x)
