import haiku as hk
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from nets import layers
from tests import reference


def _rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


CONV_CASES = {
    # name: (input shape, kernel shape HWIO, stride, padding, dilation, groups)
    "grouped_3x3": ((2, 9, 9, 8), (3, 3, 2, 12), 2, "torch", 1, 4),
    "grouped_dilated": ((2, 11, 11, 8), (3, 3, 4, 8), 1, "torch", 2, 2),
    "depthwise_same": ((2, 9, 9, 6), (3, 3, 1, 6), 2, "same", 1, 6),
    "depthwise_multiplier_5x5": ((2, 10, 10, 4), (5, 5, 1, 8), 1, "torch", 1, 4),
    "depthwise_dilated": ((1, 12, 12, 4), (3, 3, 1, 4), 1, "same", 3, 4),
    "pointwise_strided": ((2, 9, 9, 8), (1, 1, 8, 16), 2, "torch", 1, 1),
    "pointwise_grouped": ((2, 6, 6, 8), (1, 1, 2, 12), 1, "torch", 1, 4),
    "dense_wide_strided": ((2, 9, 9, 32), (3, 3, 32, 16), 2, "same", 1, 1),
    "grouped_wide_same": ((2, 8, 8, 64), (3, 3, 32, 64), 2, "same", 1, 2),
    "dense_7x7_same": ((1, 15, 15, 3), (7, 7, 3, 4), 2, "same", 1, 1),
    "video_grouped_3x3x3": ((1, 4, 6, 6, 4), (3, 3, 3, 2, 4), 1, "torch", 1, 2),
}


@pytest.mark.parametrize("lowering", ["cpu", "cpu_loop"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_cpu_lowerings_equal_native_conv_in_value_and_gradient(case, lowering):
    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[case]
    x, w = _rand(*x_shape), _rand(*w_shape, seed=1)
    cotangent = _rand(*layers.conv(x, w, stride=stride, padding=padding, dilation=dilation,
                                   groups=groups, lowering="native").shape, seed=2)

    def run(lowering):
        f = lambda x, w: layers.conv(x, w, stride=stride, padding=padding, dilation=dilation,
                                     groups=groups, lowering=lowering)
        y, vjp = jax.vjp(f, x, w)
        return y, vjp(cotangent)

    (y_native, g_native), (y_cpu, g_cpu) = run("native"), run(lowering)
    assert y_cpu.shape == y_native.shape
    np.testing.assert_allclose(y_cpu, y_native, atol=2e-5, rtol=1e-5)
    for a, b in zip(g_cpu, g_native):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _convs_traced(case, in_loop):
    """The conv-like primitives of one "auto" conv's forward and backward, as traced here."""
    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[case]
    lowering = "auto_in_loop" if in_loop else "auto"
    f = lambda x, w: jnp.sum(layers.conv(x, w, stride=stride, padding=padding,
                                         dilation=dilation, groups=groups, lowering=lowering))
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(_rand(*x_shape), _rand(*w_shape))
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return [n for n in names if n in ("conv_general_dilated", "dot_general", "mul")]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("in_loop", [False, True])
def test_accelerators_keep_xlas_native_convolutions(monkeypatch, backend, in_loop):
    """The CPU lowerings are chosen on XLA:CPU only: on a GPU or TPU backend every conv, in a
    scan or not, is one native convolution forward and XLA's own gradient convolutions."""
    monkeypatch.delenv("NETS_CONV_LOWERING", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert layers.default_lowering(in_loop=in_loop) == "native"
    for case in ("grouped_3x3", "depthwise_same", "pointwise_strided", "dense_wide_strided"):
        convs = _convs_traced(case, in_loop)
        # the forward, the input gradient and the kernel gradient: three convolutions
        assert convs == ["conv_general_dilated"] * 3, (case, convs)
    assert _max_pool_primitives() == {"reduce_window_max", "select_and_scatter_add"}
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert layers.default_lowering(in_loop=in_loop) == ("cpu_loop" if in_loop else "cpu")
    assert "dot_general" in _convs_traced("pointwise_strided", in_loop)  # a 1x1 as a matmul
    assert _max_pool_primitives() == {"max"}  # shifted slices, no reduce_window


def _max_pool_primitives():
    """The pooling primitives of an "auto" max-pool's forward and backward, as traced here."""
    f = lambda x: jnp.sum(layers.max_pool(x, 3, 2, padding=1))
    jaxpr = jax.make_jaxpr(jax.grad(f))(_rand(2, 9, 9, 3))
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    for eqn in jaxpr.jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= {e.primitive.name for e in sub.eqns}
    return {n for n in names if n == "max" or "window" in n or "scatter" in n}


POOL_CASES = {
    # name: (input shape, window, stride, padding)
    "resnet_stem_odd": ((2, 9, 9, 3), 3, 2, 1),
    "resnet_stem_even": ((2, 8, 8, 3), 3, 2, 1),
    "tf_same": ((2, 8, 8, 3), 3, 2, "same"),
    "window_2_stride_1": ((2, 7, 7, 3), 2, 1, 0),
    "one_d": ((2, 10, 5), 3, 2, 1),
    "video": ((1, 4, 6, 6, 2), 3, 2, 1),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_cpu_max_pool_equals_native_in_value_and_gradient_with_ties(case):
    """The shifted-slice max-pool gives each window's gradient to its first maximum, as XLA's
    select-and-scatter does. Inputs ReLU'd from {-2..2} make most windows tie (zeros);
    integer cotangents keep the gradient's sums exact, so both are compared for equality."""
    shape, window, stride, padding = POOL_CASES[case]
    rng = np.random.default_rng(0)
    x = jax.nn.relu(jnp.asarray(rng.integers(-2, 3, shape), jnp.float32))
    assert float(jnp.mean(x == 0)) > 0.5

    def run(lowering):
        y, vjp = jax.vjp(lambda x: layers.max_pool(x, window, stride, padding, lowering), x)
        cotangent = jnp.asarray(rng.integers(1, 9, y.shape), jnp.float32)
        return y, vjp(cotangent)[0]

    rng = np.random.default_rng(1)
    y_native, g_native = run("native")
    rng = np.random.default_rng(1)
    y_cpu, g_cpu = run("cpu")
    np.testing.assert_array_equal(y_cpu, y_native)
    np.testing.assert_array_equal(g_cpu, g_native)


def test_same_padding_is_tensorflows():
    x, w = _rand(1, 10, 10, 3), _rand(3, 3, 3, 5, seed=1)
    ours = layers.conv(x, w, stride=2, padding="same", lowering="native")
    tf_same = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(ours, tf_same, atol=1e-5)
    assert layers.conv_padding("same", (10,), (3,), (2,), (1,)) == [(0, 1)]


def test_explicit_padding_pairs_are_used_as_given():
    x, w = _rand(1, 9, 9, 3), _rand(3, 3, 3, 4, seed=1)
    ours = layers.conv(x, w, stride=2, padding=((0, 1), (0, 1)), lowering="native")
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    valid = jax.lax.conv_general_dilated(padded, w, (2, 2), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(ours, valid, atol=1e-5)
    with pytest.raises(ValueError, match="one \\(low, high\\) pair per spatial dim"):
        layers.conv_padding(((0, 1),), (9, 9), (3, 3), (2, 2), (1, 1))


def test_channel_shuffle_interleaves_the_groups():
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(layers.channel_shuffle(x, 2)[0, 0, 0], [0, 3, 1, 4, 2, 5])
    np.testing.assert_array_equal(layers.channel_shuffle(x, 3)[0, 0, 0], [0, 2, 4, 1, 3, 5])
    with pytest.raises(ValueError, match="do not divide into 4 groups"):
        layers.channel_shuffle(x, 4)


@pytest.mark.parametrize("kernel,stride,dilation,size", [(7, 2, 1, 15), (3, 1, 2, 9), (3, 2, 1, 8)])
def test_torch_padding_matches_pytorch_conv2d(kernel, stride, dilation, size):
    torch = reference.torch()
    x, w = _rand(2, size, size, 4), _rand(kernel, kernel, 4, 6, seed=1)
    ours = layers.conv(x, w, stride=stride, padding="torch", dilation=dilation)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                     torch.from_numpy(w.transpose(3, 2, 0, 1)), stride=stride,
                                     padding=dilation * (kernel - 1) // 2, dilation=dilation)
    np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def _bn_apply(x, is_training, params=None, state=None, **kwargs):
    f = hk.transform_with_state(lambda x, t: layers.BatchNorm(**kwargs)(x, t))
    if params is None:
        params, state = f.init(None, x, True)
    return f.apply(params, state, None, x, is_training), params


def test_batchnorm_matches_pytorch_in_training_and_eval_including_running_statistics():
    torch = reference.torch()
    bn = torch.nn.BatchNorm2d(5)  # momentum 0.1, eps 1e-5, unbiased running variance
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5) + 0.5)
        bn.bias.copy_(torch.randn(5))
    f = hk.transform_with_state(lambda x, t: layers.BatchNorm()(x, t))
    params, state = f.init(None, _rand(2, 4, 4, 5), True)
    params = {"batch_norm": {"scale": jnp.asarray(bn.weight.detach().numpy()),
                             "offset": jnp.asarray(bn.bias.detach().numpy())}}
    for step in range(3):
        x = _rand(3, 4, 4, 5, seed=step) * 2 + 1
        y, state = f.apply(params, state, None, x, True)
        ref = bn.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
        np.testing.assert_allclose(y, ref.transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(state["batch_norm"]["mean"], bn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(state["batch_norm"]["var"], bn.running_var.numpy(), atol=1e-6)
    x = _rand(2, 4, 4, 5, seed=9)
    y, _ = f.apply(params, state, None, x, False)
    ref = bn.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    np.testing.assert_allclose(y, ref.transpose(0, 2, 3, 1), atol=1e-5)


def test_batchnorm_state_is_only_running_mean_and_variance_and_init_leaves_it_fresh():
    (y, state), params = _bn_apply(_rand(2, 3, 3, 4), True)
    assert set(state["batch_norm"]) == {"mean", "var"}
    assert set(params["batch_norm"]) == {"scale", "offset"}
    f = hk.transform_with_state(lambda x: layers.BatchNorm()(x, True))
    _, fresh = f.init(None, _rand(2, 3, 3, 4) + 5)
    np.testing.assert_array_equal(fresh["batch_norm"]["mean"], np.zeros(4))


def test_batchnorm_keras_convention_uses_biased_running_variance():
    x = _rand(4, 2, 2, 3) * 3
    f = hk.transform_with_state(
        lambda x: layers.BatchNorm(decay=0.99, eps=1e-3, unbiased_running_var=False)(x, True))
    params, state = f.init(None, x)
    _, state = f.apply(params, state, None, x)
    expected = 0.99 * 1.0 + 0.01 * x.reshape(-1, 3).var(axis=0)
    np.testing.assert_allclose(state["batch_norm"]["var"], expected, rtol=1e-5)


def test_batchnorm_keeps_float32_statistics_under_bfloat16():
    x = jnp.asarray(_rand(2, 4, 4, 3) * 100 + 1000, jnp.bfloat16)
    (y, state), _ = _bn_apply(x, True)
    assert y.dtype == jnp.bfloat16 and state["batch_norm"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(jnp.mean(y.astype(jnp.float32), (0, 1, 2)), 0, atol=0.05)


@pytest.mark.parametrize("size", [8, 9])
def test_max_pool_matches_pytorch(size):
    torch = reference.torch()
    x = _rand(2, size, size, 3)
    ref = torch.nn.MaxPool2d(3, 2, 1)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(layers.max_pool(x, 3, 2, 1), ref.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("window,stride,padding,ceil_mode,count_include_pad", [
    (2, 2, 0, True, False),  # ResNet-D shortcut
    (3, 2, 1, True, True),
    (3, 2, 1, False, False),
    (2, 1, 0, False, True),
])
@pytest.mark.parametrize("size", [7, 8])
def test_avg_pool_matches_pytorch(window, stride, padding, ceil_mode, count_include_pad, size):
    torch = reference.torch()
    x = _rand(2, size, size, 3)
    pool = torch.nn.AvgPool2d(window, stride, padding, ceil_mode=ceil_mode,
                              count_include_pad=count_include_pad)
    ref = pool(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    ours = layers.avg_pool(x, window, stride, padding, ceil_mode, count_include_pad)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_squeeze_excite_computes_its_definition():
    x = _rand(2, 5, 5, 8)
    f = hk.transform(lambda x: layers.SqueezeExcite(2, name="se")(x))
    params = f.init(jax.random.key(0), x)
    assert {k: v["w"].shape for k, v in params.items()} == {"se/fc1": (8, 2),
                                                            "se/fc2": (2, 8)}
    p1, p2 = params["se/fc1"], params["se/fc2"]
    s = np.maximum(x.mean((1, 2)) @ p1["w"] + p1["b"], 0) @ p2["w"] + p2["b"]
    expected = x * (1 / (1 + np.exp(-s)))[:, None, None, :]
    np.testing.assert_allclose(f.apply(params, None, x), expected, rtol=1e-5, atol=1e-6)
    no_bias = hk.transform(lambda x: layers.SqueezeExcite(2, with_bias=False)(x))
    assert all(set(p) == {"w"} for p in no_bias.init(jax.random.key(0), x).values())


def _drop(x, rate, is_training, scale_at, seed=0):
    f = hk.transform(lambda x: layers.stochastic_depth(x, rate, is_training, scale_at))
    return np.asarray(f.apply({}, jax.random.key(seed), x))


def test_stochastic_depth_drops_whole_samples_and_rescales_the_kept_ones():
    x = np.ones((4000, 2, 2, 3), np.float32)
    y = _drop(x, 0.25, True, "train")
    per_sample = y.reshape(4000, -1)
    assert set(np.unique(per_sample)) == {0.0, np.float32(1 / 0.75)}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # whole samples
    assert abs((per_sample[:, 0] > 0).mean() - 0.75) < 0.03
    np.testing.assert_array_equal(_drop(x, 0.25, False, "train"), x)


def test_stochastic_depth_paper_mode_scales_at_test_time():
    x = np.ones((1000, 1, 1, 2), np.float32)
    assert set(np.unique(_drop(x, 0.5, True, "test"))) == {0.0, 1.0}
    np.testing.assert_allclose(_drop(x, 0.2, False, "test"), 0.8 * x)
    with pytest.raises(ValueError, match="scale_at"):
        _drop(x, 0.2, False, "never")


def test_stochastic_depth_without_rescaling_as_the_nfnet_code():
    x = np.ones((1000, 1, 1, 2), np.float32)
    assert set(np.unique(_drop(x, 0.5, True, "none"))) == {0.0, 1.0}
    np.testing.assert_array_equal(_drop(x, 0.5, False, "none"), x)


def test_make_divisible_follows_the_mobilenet_rule():
    assert [layers.make_divisible(v) for v in (16, 20, 30, 37, 3)] == [16, 24, 32, 40, 8]
    assert layers.make_divisible(256 / 16, 8, round_limit=0.0) == 16


def test_activations_by_name():
    x = jnp.linspace(-5, 5, 11)
    np.testing.assert_allclose(layers.activation("hard_sigmoid")(x), np.clip(x / 6 + 0.5, 0, 1))
    np.testing.assert_allclose(layers.activation("relu6")(x), np.clip(x, 0, 6))
    with pytest.raises(ValueError, match="unknown activation 'reluu'"):
        layers.activation("reluu")
