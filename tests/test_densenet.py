"""DenseNet against torchvision: counts, eval and training outputs, running statistics and
gradients on converted weights; memory_efficient (remat) against the plain network; dropout,
init, features and input checks."""

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import count, jitted_apply, jitted_logits_and_features, random_images

DENSENETS = nets.list_models("densenet[0-9]*")  # torchvision's; the CIFAR ones at the end
SIZE = 64  # every block still sees a >= 2x2 map
# A small DenseNet (four blocks, every option but drop_rate off its default) whose compiles are
# cheap; torchvision builds the same network from the same arguments.
TINY = dict(growth_rate=8, block_config=(2, 2, 1, 1), num_init_features=16, bn_size=2)
TINY_CLASSES = 10


def _widths(growth_rate, block_config, num_init_features, **_):
    """Channels of each block's output: the paper's rule (k per layer, compression 0.5)."""
    widths, c = [], num_init_features
    for n in block_config:
        c += n * growth_rate
        widths.append(c)
        c //= 2
    return widths


def test_the_registered_variants():
    assert DENSENETS == ["densenet121", "densenet161", "densenet169", "densenet201"]
    for name in DENSENETS:
        info = nets.model_info(name)
        assert (info.family, info.reference, info.classifier, info.feature_strides) == (
            "densenet", f"torchvision:{name}", "classifier", (4, 8, 16, 32))
    config = nets.model_info("densenet161").config
    assert (config["growth_rate"], config["num_init_features"]) == (48, 96)


# ----------------------------------------------------------------------------------------------
# Outputs against torchvision


def _to_torch(images):
    return reference.torch().from_numpy(images.transpose(0, 3, 1, 2).copy())


def test_logits_and_stage_maps_equal_torchvision():
    torch = reference.torch()
    torch.manual_seed(0)
    model = reference.torchvision().models.densenet121().eval()
    reference.randomize_batchnorm(model)
    maps = {}

    def keep(stage, transform=lambda a: a):
        def hook(module, inputs, out):  # a copy: torchvision's final ReLU works in place
            maps[stage] = transform(out.numpy().transpose(0, 2, 3, 1).copy())
        return hook

    taps = [getattr(model.features, f"denseblock{i}").register_forward_hook(keep(f"stage{i}"))
            for i in (1, 2, 3)]
    taps.append(model.features.norm5.register_forward_hook(
        keep("stage4", lambda a: np.maximum(a, 0))))
    images = random_images(2, SIZE)
    with torch.no_grad():
        ref_logits = model(_to_torch(images)).numpy()
    for tap in taps:
        tap.remove()

    params, state = nets.convert.from_torch("densenet121", model.state_dict())
    (logits, ours), _ = jitted_logits_and_features("densenet121")(params, state, None, images)
    assert np.abs(ref_logits).max() > 0.1  # a meaningful comparison, not of zeros
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert set(ours) == set(maps) == {"stage1", "stage2", "stage3", "stage4"}
    for stage, ref_map in maps.items():
        np.testing.assert_allclose(ours[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


@functools.cache
def _tiny_torchvision():
    """The TINY network in torchvision (random init, BN randomised) and its converted weights."""
    torch = reference.torch()
    torch.manual_seed(1)
    model = reference.torchvision().models.DenseNet(num_classes=TINY_CLASSES, **TINY)
    reference.randomize_batchnorm(model, seed=1)
    params, state = nets.convert.from_torch("densenet121", model.state_dict(), **TINY)
    return model, params, state


def _loss(logits):
    return (logits ** 2).sum()


@functools.cache
def _tiny_train_grad(**overrides):
    """Jitted (params, state, rng, images) -> (d loss / d params, (logits, new state))."""
    f = nets.transformed("densenet121", TINY_CLASSES, **TINY, **overrides)

    def loss(params, state, rng, images):
        logits, new_state = f.apply(params, state, rng, images, is_training=True)
        return _loss(logits), (logits, new_state)

    return jax.jit(jax.grad(loss, has_aux=True))


def _assert_trees_close(ours, theirs, atol, rtol):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for path, a in jax.tree_util.tree_leaves_with_path(ours):
        b = functools.reduce(lambda t, k: t[k.key], path, theirs)
        np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=jax.tree_util.keystr(path))


def test_training_outputs_running_statistics_and_gradients_equal_torchvision():
    model, params, state = _tiny_torchvision()
    images = random_images(2, SIZE, seed=3)
    model_copy = reference.torchvision().models.DenseNet(num_classes=TINY_CLASSES, **TINY)
    model_copy.load_state_dict(model.state_dict())  # the shared model stays untouched
    model_copy.train().zero_grad()
    ref_logits = model_copy(_to_torch(images))
    _loss(ref_logits).backward()
    grads = {k: p.grad for k, p in model_copy.named_parameters()}
    ref_grads, ref_state = nets.convert.from_torch(
        "densenet121", {**model_copy.state_dict(), **grads}, **TINY)

    ours, (logits, new_state) = _tiny_train_grad()(params, state, None, images)
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), atol=1e-4, rtol=0)
    _assert_trees_close(new_state, ref_state, atol=1e-5, rtol=1e-5)
    assert max(np.abs(g).max() for g in jax.tree.leaves(ref_grads)) > 1e-2
    _assert_trees_close(ours, ref_grads, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# memory_efficient, dropout, init


def test_memory_efficient_gives_the_same_outputs_and_gradients_and_stores_less():
    _, params, state = _tiny_torchvision()
    images = random_images(2, SIZE, seed=4)
    plain_grads, (plain_logits, plain_state) = _tiny_train_grad()(params, state, None, images)
    grads, (logits, new_state) = _tiny_train_grad(memory_efficient=True)(params, state, None,
                                                                         images)
    np.testing.assert_allclose(logits, plain_logits, atol=1e-6, rtol=1e-6)
    _assert_trees_close(new_state, plain_state, atol=1e-6, rtol=1e-6)
    _assert_trees_close(grads, plain_grads, atol=1e-6, rtol=1e-5)

    # What the backward pass keeps: the leaves of jax.vjp's function are its residuals. Without
    # remat every dense layer stores at least one copy of its concatenated input (for the BN
    # and conv backward), a cost quadratic in the block depth; with remat the bottleneck keeps
    # only its inputs, the block's maps, each stored once.
    def stored(**overrides):
        f = nets.transformed("densenet121", TINY_CLASSES, **TINY, **overrides)

        def residuals(params, state, images):
            _, vjp = jax.vjp(lambda p: f.apply(p, state, None, images, is_training=True)[0],
                             params)
            return jax.tree.leaves(vjp)

        return sum(a.size for a in jax.eval_shape(residuals, params, state, images))

    concatenations, c, side = 0, TINY["num_init_features"], SIZE // 4
    for n in TINY["block_config"]:
        for _ in range(n):
            concatenations += images.shape[0] * side * side * c
            c += TINY["growth_rate"]
        c, side = c // 2, side // 2
    assert stored() - stored(memory_efficient=True) >= concatenations


def test_dropout_drops_each_dense_layers_new_channels_in_training_only():
    _, params, state = _tiny_torchvision()
    no_head = {k: v for k, v in params.items() if not k.endswith("/classifier")}
    images = random_images(2, SIZE, seed=5)
    rate, c0, k = 0.5, TINY["num_init_features"], TINY["growth_rate"]
    plain = jitted_apply("densenet121", features=True, **TINY)
    drop = jitted_apply("densenet121", features=True, drop_rate=rate, **TINY)
    # The first dense layer's new channels in block 1: its inputs see no dropout, so they are
    # the plain values, zeroed or scaled by 1 / (1 - rate).
    reference_new = plain(no_head, state, None, images, is_training=True)[0]["stage1"]
    reference_new = np.asarray(reference_new[..., c0:c0 + k])
    maps_a, _ = drop(no_head, state, jax.random.key(0), images, is_training=True)
    maps_b, _ = drop(no_head, state, jax.random.key(1), images, is_training=True)
    new = np.asarray(maps_a["stage1"][..., c0:c0 + k])
    kept = new != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(new[kept], reference_new[kept] / (1 - rate),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(maps_a["stage4"], maps_b["stage4"])
    # In eval mode the network is the plain one, operation for operation (and needs no rng).
    def eval_jaxpr(**overrides):
        f = nets.transformed_features("densenet121", **TINY, **overrides)
        return str(jax.make_jaxpr(lambda p, s, x: f.apply(p, s, None, x, is_training=False))(
            no_head, state, images))

    assert eval_jaxpr(drop_rate=rate) == eval_jaxpr()


def test_init_is_torchvisions_he_normal_over_fan_in():
    f = nets.transformed("densenet121", TINY_CLASSES, **TINY)
    # XLA's optimising passes over the random-number code make up most of an init compile
    # (~7 s of ~9 s here); the statistics checked below do not depend on them.
    fast_compile = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    params, _ = jax.jit(f.init, static_argnames="is_training", compiler_options=fast_compile)(
        jax.random.key(0), random_images(1, 32), is_training=True)
    stem = np.asarray(params["densenet/conv0"]["w"])  # 7x7x3 -> 16: fan-in 147, fan-out 784
    np.testing.assert_allclose(stem.std(), np.sqrt(2 / 147), rtol=0.05)
    assert abs(stem.mean()) < 0.01
    # Every dense layer's 3x3 conv: bn_size * k = 16 in, k = 8 out.
    conv2 = np.concatenate([np.ravel(v["w"]) for k, v in params.items()
                            if k.endswith("/conv2")])
    assert conv2.size == sum(TINY["block_config"]) * 9 * 16 * 8
    np.testing.assert_allclose(conv2.std(), np.sqrt(2 / (9 * 16)), rtol=0.05)
    head = params["densenet/classifier"]
    bound = 1 / np.sqrt(_widths(**TINY)[-1])  # PyTorch's nn.Linear default, bias zero
    assert np.abs(head["w"]).max() <= bound and np.abs(head["w"]).max() > 0.9 * bound
    np.testing.assert_array_equal(head["b"], 0)
    norms = [v for k, v in params.items() if "norm" in k.rsplit("/", 1)[-1]]
    assert len(norms) == 2 * sum(TINY["block_config"]) + 5  # + norm0, 3 transitions, norm5
    assert all(np.all(v["scale"] == 1) and np.all(v["offset"] == 0) for v in norms)


# ----------------------------------------------------------------------------------------------
# Features, pooled outputs, bad input


def _output_shapes(f, size=SIZE, channels=3):
    images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   images)
    out, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                            params, state, images)
    return jax.tree.map(lambda a: a.shape, out)


@pytest.mark.parametrize("name", ["densenet121", "densenet161"])
def test_features_are_the_dense_block_outputs_at_strides_4_to_32(name):
    info = nets.model_info(name)
    widths = _widths(info.config.get("growth_rate", 32), info.config["block_config"],
                     info.config.get("num_init_features", 64))
    shapes = _output_shapes(nets.transformed_features(name))
    assert shapes == {f"stage{i + 1}": (1, SIZE // s, SIZE // s, widths[i])
                      for i, s in enumerate(info.feature_strides)}
    if name == "densenet121":  # num_classes=0: the pooled last map
        assert _output_shapes(nets.transformed(name, 0)) == (1, widths[-1])


def test_bad_images_and_options_are_clear_errors():
    f = nets.transformed("densenet121", TINY_CLASSES, **TINY)
    with pytest.raises(ValueError, match=r"densenet expects .* with 3 channels; got an array "
                                         r"of rank 3"):
        jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                       jax.ShapeDtypeStruct((32, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"got shape \(1, 32, 32, 1\) with 1 channels"):
        _output_shapes(f, 32, 1)
    gray = nets.transformed("densenet121", TINY_CLASSES, in_channels=1, **TINY)
    assert _output_shapes(gray, 32, 1) == (1, TINY_CLASSES)
    for bad, match in [(dict(drop_rate=1.0), "drop_rate"), (dict(block_config=()), "block_config"),
                       (dict(block_config=(6, 0, 24, 16)), "block_config"),
                       (dict(growth_rate=0), "growth_rate"), (dict(bn_size=-4), "bn_size")]:
        with pytest.raises(ValueError, match=match):
            _output_shapes(nets.transformed("densenet121", **bad), 32)


# ----------------------------------------------------------------------------------------------
# The paper's CIFAR DenseNet-BC and the compression option

CIFAR_DENSENETS = nets.list_models("densenet_bc_*")


def _abstract_variables(name, **overrides):
    """(params, state) shapes of `nets.create(name, **overrides)` from an abstract trace with
    zeros for initialisers and XLA's native convs (shapes depend on neither; the trace takes
    half the time of `nets.introspect.shapes`)."""
    def forward(images):
        with hk.custom_creator(lambda next_creator, shape, dtype, init, context:
                               jnp.zeros(shape, dtype), params=True, state=True):
            return nets.create(name, **overrides)(images, is_training=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NETS_CONV_LOWERING", "native")
        return jax.eval_shape(hk.transform_with_state(forward).init, jax.random.key(0),
                              nets.introspect.example_images(name, 1, 32))
# DenseNet-BC with two layers per block and k=6: torchvision's DenseNet builds the same layers.
TINY_BC = dict(growth_rate=6, block_config=(2, 2, 2), num_init_features=12)


def test_the_cifar_variants_are_the_papers_networks():
    assert CIFAR_DENSENETS == ["densenet_bc_100_12", "densenet_bc_190_40", "densenet_bc_250_24"]
    for name in CIFAR_DENSENETS:
        depth, k = map(int, name.split("_")[2:])
        info = nets.model_info(name)
        assert info.config == dict(growth_rate=k, block_config=((depth - 4) // 6,) * 3,
                                   num_init_features=2 * k, stem="cifar", conv_init="fan_out")
        assert (info.family, info.feature_strides, info.train_size, info.test_size) == (
            "densenet", (1, 2, 4), 32, 32)
        assert nets.default_num_classes(name) == 10
        assert info.preprocessing.crop_fraction == 1.0


def _bc_hand_count(depth, k, num_classes, compression=0.5):
    """(parameters, BN statistic elements) of the authors' CIFAR DenseNet-BC: a 3x3 conv
    3 -> 2k; per dense layer BN(c), 1x1 conv c -> 4k, BN(4k), 3x3 conv 4k -> k; per
    transition BN(c), 1x1 conv c -> floor(theta c); the final BN; the fc with bias."""
    params, bn, c = 9 * 3 * 2 * k, [], 2 * k
    for block in range(3):
        for _ in range((depth - 4) // 6):
            params += c * 4 * k + 9 * 4 * k * k
            bn += [c, 4 * k]
            c += k
        bn.append(c)
        if block < 2:
            params += c * math.floor(compression * c)
            c = math.floor(compression * c)
    return params + 2 * sum(bn) + c * num_classes + num_classes, 2 * sum(bn)


@pytest.mark.parametrize("name,paper_millions", [
    ("densenet_bc_100_12", 0.8), ("densenet_bc_250_24", 15.3), ("densenet_bc_190_40", 25.6)])
def test_cifar_counts_equal_the_hand_count_and_round_to_the_papers_table(name, paper_millions):
    depth, k = map(int, name.split("_")[2:])
    params, state = _abstract_variables(name)  # the default head: 10 classes
    expected, bn_stats = _bc_hand_count(depth, k, 10)
    assert count(params) == expected and count(state) == bn_stats
    assert round(count(params) / 1e6, 1) == paper_millions
    if name == "densenet_bc_100_12":
        assert count(params) == 769_162


def _cifar_torchvision(torch, num_classes):
    """torchvision's DenseNet with the authors' CIFAR stem: the 3x3 conv alone (conv0; no
    norm0, relu0, pool0). Dense layers, transitions and norm5 are the Lua network's."""
    model = reference.torchvision().models.DenseNet(num_classes=num_classes, **TINY_BC)
    model.features.conv0 = torch.nn.Conv2d(3, TINY_BC["num_init_features"], 3, 1, 1, bias=False)
    for module in ("norm0", "relu0", "pool0"):
        delattr(model.features, module)
    return model


def test_cifar_logits_and_stage_maps_equal_torchvision_with_the_cifar_stem():
    torch = reference.torch()
    torch.manual_seed(0)
    model = _cifar_torchvision(torch, 10)
    reference.he_normal_convs(model)
    reference.randomize_batchnorm(model)
    model.eval()
    maps = {}

    def keep(stage, transform=lambda a: a):
        def hook(module, inputs, out):
            maps[stage] = transform(out.numpy().transpose(0, 2, 3, 1).copy())
        return hook

    taps = [getattr(model.features, f"denseblock{i}").register_forward_hook(keep(f"stage{i}"))
            for i in (1, 2)]
    taps.append(model.features.norm5.register_forward_hook(
        keep("stage3", lambda a: np.maximum(a, 0))))
    images = random_images(2, 32)
    with torch.no_grad():
        ref_logits = model(_to_torch(images)).numpy()
    for tap in taps:
        tap.remove()

    name = "densenet_bc_100_12"
    params, state = nets.convert.from_torch(name, model.state_dict(), **TINY_BC)
    assert "densenet/norm0" not in params and params["densenet/conv0"]["w"].shape == (3, 3, 3, 12)
    (logits, ours), _ = jitted_logits_and_features(name, 10, **TINY_BC)(params, state, None,
                                                                        images)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
    assert {k: v.shape for k, v in ours.items()} == {
        "stage1": (2, 32, 32, 24), "stage2": (2, 16, 16, 24), "stage3": (2, 8, 8, 24)}
    for stage, ref_map in maps.items():
        np.testing.assert_allclose(ours[stage], ref_map, atol=1e-4 * np.abs(ref_map).max(),
                                   rtol=0, err_msg=stage)


def _transition_widths(name, **overrides):
    params, _ = _abstract_variables(name, **overrides)
    return [params[f"densenet/transition{i}/conv"]["w"].shape[-1] for i in (1, 2, 3)
            if f"densenet/transition{i}/conv" in params]


def test_compression_sets_transition_widths_to_the_floor_of_theta_c():
    # DenseNet-121 with theta 0.55: blocks end at 256, 524, 1056 channels -> floor(140.8),
    # floor(288.2), floor(580.8) (rounding would give 141 and 581); 580 + 16 * 32 at the end.
    assert _transition_widths("densenet121", compression=0.55) == [140, 288, 580]
    params, _ = _abstract_variables("densenet121", compression=0.55)
    assert params["densenet/classifier"]["w"].shape == (1092, 1000)
    # No compression: each block passes all its channels on.
    assert _transition_widths("densenet121", compression=1.0) == [256, 640, 1408]
    # The CIFAR net: the hand count follows theta too (100-12 with theta 0.7: 24 + 16 * 12
    # = 216 -> 151; 151 + 192 = 343 -> 240).
    params, _ = _abstract_variables("densenet_bc_100_12", compression=0.7)
    assert [params[f"densenet/transition{i}/conv"]["w"].shape[-1] for i in (1, 2)] == [151, 240]
    assert count(params) == _bc_hand_count(100, 12, 10, compression=0.7)[0]


def test_cifar_init_is_the_lua_codes_he_normal_over_fan_out():
    f = nets.transformed("densenet_bc_100_12", 10, **TINY_BC)
    fast_compile = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    params, _ = jax.jit(f.init, static_argnames="is_training", compiler_options=fast_compile)(
        jax.random.key(0), random_images(1, 8), is_training=True)
    stem = np.asarray(params["densenet/conv0"]["w"])  # 3x3x3 -> 12: fan-out 108, fan-in 27
    np.testing.assert_allclose(stem.std(), np.sqrt(2 / 108), rtol=0.12)
    conv2 = np.concatenate([np.ravel(v["w"]) for k, v in params.items() if k.endswith("/conv2")])
    np.testing.assert_allclose(conv2.std(), np.sqrt(2 / (9 * 6)), rtol=0.05)  # 24 -> 6


@pytest.mark.parametrize("bad,match", [
    (dict(compression=0.0), "compression"), (dict(compression=1.5), "compression"),
    (dict(stem="tiny"), "stem"), (dict(conv_init="uniform"), "conv_init")])
def test_bad_cifar_options_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        nets.introspect.shapes("densenet_bc_100_12", **bad)

