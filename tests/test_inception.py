"""GoogLeNet and Inception-v3 against their references on converted weights: torchvision's
`googlenet` (eval, and training mode with its auxiliary heads, running statistics included) and
`inception_v3` (eval; its auxiliary head alone), keras.applications' `InceptionV3` (eval);
parameter counts with and without the auxiliary heads; the classification objective's
auxiliary losses; input checks.

Sizes: GoogLeNet at 64 px (eval) and 96 px (training: the auxiliary heads' adaptive 4x4
pooling then averages overlapping windows of a 6x6 map); Inception-v3 at 107 px, which leaves
every stage at least 2 pixels wide (its unpadded convs need 75 px; 299 px gives 71, 35, 17, 8).
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import inception, layers
from tests import reference
from tests.helpers import count, jitted_apply, jitted_logits_and_features, random_images
from tests.test_keras_reference import _keras_outputs, _numpy_initializers

V3_SIZE = 107


def _to_torch(images):
    return reference.torch().from_numpy(images.transpose(0, 3, 1, 2).copy())


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1).copy()


@functools.cache
def _torch_model(constructor: str, **kwargs):
    """A torchvision model (weights=None, transform_input off) with He-normal convs and random
    BatchNorm statistics, built once per module for each set of arguments."""
    torch = reference.torch()
    torch.manual_seed(0)
    model = getattr(reference.torchvision().models, constructor)(init_weights=False, **kwargs)
    reference.he_normal_convs(model)
    reference.randomize_batchnorm(model)
    return model.eval()


def _torch_counts(model):
    params = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("_mean", "_var")))
    return params, params - sum(p.numel() for p in model.fc.parameters()), stats


def test_the_registered_variants():
    assert nets.list_models("*inception*") + nets.list_models("googlenet*") == [
        "inception_v3", "keras_inception_v3", "googlenet"]
    for name, reference_name in (("googlenet", "torchvision:googlenet"),
                                 ("inception_v3", "torchvision:inception_v3"),
                                 ("keras_inception_v3", "keras:InceptionV3")):
        info = nets.model_info(name)
        assert (info.family, info.reference, info.classifier) == ("inception", reference_name,
                                                                  "fc")
        assert info.config.get("aux_logits", False) is False  # the inference form
        # [-1, 1] inputs: what torchvision's transform_input=True makes of its normalised ones
        assert info.preprocessing.mean == info.preprocessing.std == (0.5, 0.5, 0.5)
    v3 = nets.model_info("inception_v3")
    assert (v3.train_size, v3.min_input_size, v3.stage_sizes(299)) == (299, 75, (71, 35, 17, 8))
    assert round(v3.test_size / v3.preprocessing.crop_fraction) == 342  # resize 342, crop 299
    assert nets.model_info("googlenet").stage_sizes(224) == (56, 28, 14, 7)


# ----------------------------------------------------------------------------------------------
# Counts


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_counts_equal_torchvision_with_and_without_auxiliary_heads(name):
    """The registry rows are the aux-free networks (torchvision's googlenet weights drop their
    heads); with aux_logits=True ours has torchvision's default network (inception_v3:
    27,161,264, its published figure). One trace, with the heads: the network without them is
    that tree without the heads' modules (the all-models suite counts the registered form
    itself against the row), without the classifier also without `fc`."""
    params, state = nets.introspect.shapes(name, aux_logits=True)
    heads = ("aux1", "aux2") if name == "googlenet" else ("AuxLogits",)
    is_aux = lambda module: module.split("/")[1] in heads  # noqa: E731
    plain = {m: v for m, v in params.items() if not is_aux(m)}
    plain_state = {m: v for m, v in state.items() if not is_aux(m)}
    assert len(plain) < len(params) and len(plain_state) < len(state)
    ours = {True: (count(params), count(params) - count(params[f"{name}/fc"]), count(state)),
            False: (count(plain), count(plain) - count(plain[f"{name}/fc"]),
                    count(plain_state))}
    for aux in (True, False):
        assert ours[aux] == _torch_counts(_torch_model(name, aux_logits=aux)), aux
    info = nets.model_info(name)
    assert (info.reference_params, info.reference_params_no_head,
            info.reference_bn_stat_elems) == ours[False]
    if name == "inception_v3":
        assert ours[True][0] == 27161264


@functools.cache
def _keras_v3(size=V3_SIZE):
    keras = reference.keras()
    with _numpy_initializers():
        model = keras.applications.InceptionV3(weights=None, input_shape=(size, size, 3),
                                               classifier_activation=None)
    reference.randomize_keras_batchnorm(model)
    return model


def test_keras_counts_equal_keras():
    """Trainable weights (Keras' count_params adds the BN moving statistics), without the
    classifier ("predictions"), and the moving statistics."""
    model = _keras_v3()
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    head = sum(int(np.prod(w.shape)) for w in model.get_layer("predictions").weights)
    stats = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    info = nets.model_info("keras_inception_v3")
    params, state = nets.introspect.shapes("keras_inception_v3")  # (no head: less `fc`)
    assert (count(params), count(params) - count(params["inception_v3/fc"]), count(state)) == (
        trainable, trainable - head, stats)
    assert (info.reference_params, info.reference_params_no_head,
            info.reference_bn_stat_elems) == (trainable, trainable - head, stats)
    assert all("scale" not in leaves for leaves in params.values())  # Keras' scale=False


# ----------------------------------------------------------------------------------------------
# Outputs against torchvision


def _hooks(model, taps, maps):
    def keep(stage):
        def hook(module, inputs, out):
            maps[stage] = _nhwc(out)
        return hook

    return [getattr(model, module).register_forward_hook(keep(stage))
            for stage, module in taps.items()]


def _compare_eval(name, model, taps, size):
    torch = reference.torch()
    maps = {}
    handles = _hooks(model, taps, maps)
    images = random_images(2, size)
    with torch.no_grad():
        ref_logits = model(_to_torch(images)).numpy()
    for h in handles:
        h.remove()
    params, state = nets.convert.from_torch(name, model.state_dict())
    (logits, ours), _ = jitted_logits_and_features(name)(params, state, None, images)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert set(ours) == set(maps)
    for stage, ref_map in maps.items():
        assert ref_map.shape[1] == nets.model_info(name).stage_sizes(size)[int(stage[-1]) - 1]
        np.testing.assert_allclose(ours[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


def test_googlenet_logits_and_stage_maps_equal_torchvision():
    _compare_eval("googlenet", _torch_model("googlenet", aux_logits=False),
                  {"stage1": "conv3", "stage2": "inception3b", "stage3": "inception4e",
                   "stage4": "inception5b"}, 64)


def test_inception_v3_logits_and_stage_maps_equal_torchvision():
    _compare_eval("inception_v3", _torch_model("inception_v3", aux_logits=False),
                  {"stage1": "Conv2d_4a_3x3", "stage2": "Mixed_5d", "stage3": "Mixed_6e",
                   "stage4": "Mixed_7c"}, V3_SIZE)


def test_googlenet_training_mode_with_auxiliary_heads_equals_torchvision():
    """Training mode with the auxiliary heads (dropout off on both sides): the main and both
    auxiliary logits, their loss weights, and every running statistic after the step (torch's
    momentum 0.1, unbiased variance)."""
    torch = reference.torch()
    model = _torch_model("googlenet", aux_logits=True, dropout=0.0, dropout_aux=0.0)
    params, state = nets.convert.from_torch("googlenet", model.state_dict(), aux_logits=True)
    images = random_images(2, 96, seed=2)
    model.train()  # this test's own model (no other test builds it with these arguments)
    with torch.no_grad():
        ref = model(_to_torch(images))
    # torch's running statistics after the step, under our names (one conversion is enough:
    # the step changes no parameter)
    torch_name = nets.model_info("googlenet").torch_name
    buffers = model.state_dict()
    ref_state = {m: {leaf: buffers[f"{torch_name(nets.records.module_path(m), {})}.running_{leaf}"]
                     .numpy() for leaf in leaves} for m, leaves in state.items()}
    f = jitted_apply("googlenet", aux_logits=True, dropout_rate=0.0, aux_dropout_rate=0.0)
    out, new_state = f(params, state, None, images, is_training=True)
    assert isinstance(out, layers.AuxiliaryOutputs) and out.weights == (0.3, 0.3)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
    for ours, theirs in zip(out.auxiliary, (ref.aux_logits1, ref.aux_logits2), strict=True):
        assert np.abs(theirs.numpy()).max() > 0.1
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)
    assert jax.tree.structure(new_state) == jax.tree.structure(ref_state)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), ref_state, state)
    assert min(jax.tree.leaves(moved)) > 1e-4  # every running statistic was updated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 new_state, ref_state)


def test_inception_v3_auxiliary_head_equals_torchvision():
    """Inception-v3's head alone (it needs the 17x17 map of 299 px inputs) on converted weights
    of torchvision's default network, and the clear error below that size."""
    torch = reference.torch()
    model = _torch_model("inception_v3", aux_logits=True)
    params, state = nets.convert.from_torch("inception_v3", model.state_dict(),
                                            aux_logits=True)
    prefix = "inception_v3/AuxLogits"
    params, state = ({k.replace("inception_v3/", ""): v for k, v in tree.items()
                      if k.startswith(prefix)} for tree in (params, state))
    x = np.abs(random_images(2, 17, channels=768, seed=4))  # post-ReLU maps
    with torch.no_grad():
        ref = model.AuxLogits(_to_torch(x)).numpy()

    def head(x):  # the head as the model builds it, at the top level
        return inception.Inception(aux_logits=True).aux_head("AuxLogits")(x, is_training=False)

    apply = jax.jit(hk.transform_with_state(head).apply)
    ours, _ = apply(params, state, None, x)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="auxiliary head needs the 17x17 map of 299 px"):
        jax.eval_shape(hk.transform_with_state(head).init, jax.random.key(0),
                       jnp.zeros((1, 16, 16, 768)))


# ----------------------------------------------------------------------------------------------
# Outputs against Keras


def test_keras_inception_v3_logits_and_stage_maps_equal_keras():
    """keras.applications' InceptionV3 (its unnamed layers converted by creation order): logits
    and the maps of mixed2, mixed7, mixed10 (our stages 2-4)."""
    model = _keras_v3()
    images = random_images(2, V3_SIZE, seed=5)
    ref_logits, *ref_maps = _keras_outputs(model, ("mixed2", "mixed7", "mixed10"), images)
    params, state = nets.convert.from_keras("keras_inception_v3", model)
    (logits, maps), _ = jitted_logits_and_features("keras_inception_v3")(params, state, None,
                                                                         images)
    assert np.abs(ref_logits).max() > 0.1
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    for stage, ref_map in zip(("stage2", "stage3", "stage4"), ref_maps):
        np.testing.assert_allclose(maps[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


# ----------------------------------------------------------------------------------------------
# Training with auxiliary heads; input checks


def test_the_objective_adds_each_auxiliary_loss_times_its_weight():
    """classification.objective: CE(main) + sum of w * CE(aux), label smoothing on each, from
    a model returning `layers.AuxiliaryOutputs`, against the sum computed by hand."""
    from training import classification

    rng = np.random.RandomState(0)
    main, aux1, aux2 = (rng.randn(4, 5).astype(np.float32) for _ in range(3))

    def forward(images, is_training):
        scale = hk.get_parameter("scale", (), init=jnp.ones)
        return layers.AuxiliaryOutputs(main * scale, (aux1 * scale, aux2 * scale), (0.3, 0.7))

    model = hk.transform_with_state(forward)
    targets = np.eye(5, dtype=np.float32)[[0, 3, 1, 4]]
    loss_fn = classification.objective(model, dtype=jnp.float32, label_smoothing=0.1)
    loss, (_, metrics) = loss_fn({"~": {"scale": jnp.ones(())}}, {}, None,
                                 {"images": np.zeros((4, 1)), "targets": targets})

    def ce(logits):
        smoothed = targets * 0.9 + 0.1 / 5
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -(smoothed * log_p).sum(-1).mean()

    np.testing.assert_allclose(loss, ce(main) + 0.3 * ce(aux1) + 0.7 * ce(aux2), rtol=1e-6)
    assert metrics["top1"] == np.mean(main.argmax(-1) == targets.argmax(-1))
    eval_logits, _ = model.apply({"~": {"scale": jnp.ones(())}}, {}, None, None, False)
    assert isinstance(eval_logits, layers.AuxiliaryOutputs)  # (the fake ignores the mode)


def test_input_checks():
    f = nets.transformed("inception_v3")
    with pytest.raises(ValueError, match="at least 75 x 75 px"):
        jax.eval_shape(functools.partial(f.init, is_training=False), jax.random.key(0),
                       jnp.zeros((1, 74, 74, 3)))
    with pytest.raises(ValueError, match="need num_classes > 0"):
        nets.introspect.shapes("googlenet", 0, aux_logits=True)
    with pytest.raises(ValueError, match="architecture must be"):
        nets.introspect.shapes("googlenet", architecture="inception_v4")
    # eval mode returns plain logits with the heads on; their parameters exist either way
    f = nets.transformed("googlenet", 10, aux_logits=True)
    images = jnp.zeros((1, 64, 64, 3))
    params, _ = jax.eval_shape(functools.partial(f.init, is_training=False),
                               jax.random.key(0), images)
    assert {"googlenet/aux1/fc2", "googlenet/aux2/fc2"} <= set(params)


def test_keras_auto_names_are_ranked_by_their_number():
    """InceptionV3's layers are unnamed: Keras numbers them per session in creation order,
    while a functional model lists them by graph depth. `from_keras` compares them by the rank
    of their number (a fresh Keras 3 session's names), whatever the offset or listing order."""
    listed = ["conv2d_96", "conv2d_94", "batch_normalization_95", "conv2d_95",
              "batch_normalization_94", "mixed0", "predictions"]
    assert nets.convert._fresh_session_names(listed) == {
        "conv2d_94": "conv2d", "conv2d_95": "conv2d_1", "conv2d_96": "conv2d_2",
        "batch_normalization_94": "batch_normalization",
        "batch_normalization_95": "batch_normalization_1"}
    keras_name = nets.model_info("keras_inception_v3").keras_name
    config = nets.model_info("keras_inception_v3").config
    assert keras_name("Conv2d_1a_3x3.conv", config) == "conv2d"
    # mixed0's branch5x5_2 is built after 7 convs (the stem's 5, branch1x1, branch5x5_1)
    assert keras_name("Mixed_5b.branch5x5_2.bn", config) == ("batch_normalization_7", -1)
    assert keras_name("Mixed_7c.branch_pool.conv", config) == "conv2d_93"


def test_fusion_folds_batchnorms_without_scale():
    """Keras' scale=False BatchNorm folds with a scale of 1: W' = W / sqrt(var + eps),
    b' = beta - mean / sqrt(var + eps)."""
    from tests.helpers import random_values

    params, state = random_values(nets.introspect.shapes("keras_inception_v3"))
    fused, fused_state = nets.fusion.fuse("keras_inception_v3", params, state)
    conv, bn = "inception_v3/Mixed_6b/branch7x7_2/conv", "inception_v3/Mixed_6b/branch7x7_2/bn"
    s = 1 / np.sqrt(state[bn]["var"].astype(np.float64) + 1e-3)
    np.testing.assert_allclose(fused[conv]["w"], params[conv]["w"] * s, rtol=1e-6)
    np.testing.assert_allclose(fused[conv]["b"], params[bn]["offset"] - state[bn]["mean"] * s,
                               rtol=1e-5, atol=1e-6)
    assert bn not in fused and not fused_state
