"""Transfer learning (training/transfer.py): non-strict loading with a fresh head, freezing
through optax masks (bit-identical frozen leaves after real train steps) and their errors. The
end-to-end train.py run is in tests/test_train.py (it reuses that file's finished run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import common
from nets.registry import module_path
from tests.helpers import random_train_state, random_variables
from training import (classification, distributed, loop, optimizers, steps, transfer,
                      weight_sources)

STEM_AND_STAGE_1 = ("conv1", "bn1", "layer1_")
SIZE = 32


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_frozen(name):
    """name: "<root>/<module path>/<leaf>" as `flat` writes it."""
    module = name.rsplit("/", 1)[0]
    return module_path(module).startswith(STEM_AND_STAGE_1)


@pytest.fixture(scope="module")
def frozen_run():
    """resnet18 at 32 px, stem + stage 1 frozen, 3 real steps of steps.train_step (weight decay,
    momentum, an EMA) on random batches of 2: (initial state, final state) as numpy trees."""
    config = common.base()
    config.model, config.data.num_classes, config.data.train_size = "resnet18", 10, SIZE
    config.ema_decay = 0.9
    config.optimizer.update(dict(base_lr=0.5, weight_decay=1e-2))
    mesh = distributed.data_mesh()
    model = nets.transformed("resnet18", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)),
                                               is_training=True))
    frozen = transfer.frozen_masks(STEM_AND_STAGE_1, *shapes)
    schedule = optimizers.learning_rate(config.optimizer, 2, 10.0, 10)
    optimizer = optimizers.optimizer(config.optimizer, "resnet18", shapes[0], schedule,
                                     frozen=frozen[0])
    state = random_train_state(model, optimizer, SIZE, ema=True)
    loss = classification.objective(model, dtype=jnp.float32, label_smoothing=0.0)
    step = steps.train_step(loss, optimizer, schedule, ema_decay=0.9, mesh=mesh, frozen=frozen)
    before = jax.device_get(state)    # the step donates `state`
    rng = np.random.default_rng(0)
    for i in range(3):
        batch = {"images": rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32),
                 "targets": np.eye(10, dtype=np.float32)[[i, i + 3]]}
        state, _ = step(state, distributed.global_batch(batch, distributed.batch_sharded(mesh)))
    return before, jax.device_get(state)


def test_frozen_leaves_are_bit_identical_after_train_steps(frozen_run):
    before, after = frozen_run
    for field in ("params", "model_state", "ema_params", "ema_model_state"):
        old, new = flat(getattr(before, field)), flat(getattr(after, field))
        frozen = [k for k in old if is_frozen(k)]
        trainable = [k for k in old if not is_frozen(k)]
        assert frozen and trainable, field
        for k in frozen:
            np.testing.assert_array_equal(new[k], old[k], err_msg=f"{field} {k}")
        for k in trainable:
            assert np.any(new[k] != old[k]), f"{field} {k} did not change"
    # The stem, stage 1 and their BN statistics: what ("conv1", "bn1", "layer1_") selects.
    assert {k.split("/")[1] for k in flat(before.model_state) if is_frozen(k)} == {
        "bn1", "layer1_0", "layer1_1"}


def test_stem_and_stage_1_patterns_select_their_parameters():
    params, state = nets.introspect.shapes("resnet18", 10)
    params_mask, state_mask = transfer.frozen_masks(STEM_AND_STAGE_1, params, state)
    sizes = zip(jax.tree.leaves(params), jax.tree.leaves(params_mask), strict=True)
    # conv1 7x7x3x64 + bn1 2x64 + two basic blocks of two 3x3x64x64 convs and their BNs.
    assert sum(s.size for s, frozen in sizes if frozen) == (
        7 * 7 * 3 * 64 + 2 * 64 + 2 * 2 * (3 * 3 * 64 * 64 + 2 * 64))
    assert sorted(m for m, leaves in state_mask.items() if all(leaves.values())) == [
        "resnet/bn1", "resnet/layer1_0/bn1", "resnet/layer1_0/bn2", "resnet/layer1_1/bn1",
        "resnet/layer1_1/bn2"]


def test_optimizer_zeroes_frozen_updates_of_any_gradient():
    """Whatever the gradient (here all ones: decay, momentum and the lr all act), the update of a
    frozen leaf is exactly zero and the others are not."""
    config = common.base()
    kept = ("resnet/conv1", "resnet/bn1", "resnet/layer4_1/conv2", "resnet/layer4_1/bn2",
            "resnet/fc")   # a few modules of each role keep the eager updates cheap
    params = {m: {k: jnp.ones(s.shape, s.dtype) for k, s in leaves.items()}
              for m, leaves in nets.introspect.shapes("resnet18", 10)[0].items() if m in kept}
    mask = {m: {k: module_path(m).startswith("layer4_") for k in leaves}
            for m, leaves in params.items()}
    for name in ("sgd", "rmsprop", "sgd_agc"):
        config.optimizer.name = name
        tx = optimizers.optimizer(config.optimizer, "resnet18", params, 0.1, frozen=mask)
        updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
        for m, leaves in updates.items():
            for k, u in leaves.items():
                assert np.all(u == 0) == mask[m][k], (name, m, k)


def weights_file(tmp_path, num_classes, seed):
    f = nets.transformed("resnet18", num_classes=num_classes)
    params, state = random_variables(f, jnp.zeros((1, SIZE, SIZE, 3)), seed=seed)
    path = tmp_path / f"resnet18_{num_classes}.safetensors"
    nets.weights.save(path, params, state, model="resnet18")
    return path, params, state


def test_new_num_classes_gets_a_fresh_head_and_everything_else_from_the_file(tmp_path):
    path, saved_params, saved_state = weights_file(tmp_path, 1000, seed=1)
    fresh_params, fresh_state = random_variables(
        nets.transformed("resnet18", num_classes=10), jnp.zeros((1, SIZE, SIZE, 3)), seed=2)
    head = nets.head_module("resnet18")
    loaded = transfer.merge(fresh_params, fresh_state, weight_sources.read(path), head=head)
    assert head == "resnet/fc"
    for name, value in flat(loaded.params).items():
        module, leaf = name.rsplit("/", 1)
        expected = fresh_params if module == head else saved_params
        np.testing.assert_array_equal(value, expected[module][leaf], err_msg=name)
    for name, value in flat(loaded.state).items():   # BN statistics are loaded too
        module, leaf = name.rsplit("/", 1)
        np.testing.assert_array_equal(value, saved_state[module][leaf], err_msg=name)
    assert loaded.head_fresh == "resnet/fc/w is (512, 1000) in the source, (512, 10) here"
    assert loaded.missing == [] and loaded.unexpected == []
    assert loaded.loaded == loaded.total - 2 == 100
    assert "the head keeps its fresh init" in loaded.summary()


def test_reset_head_keeps_a_fresh_head_of_the_same_shape(tmp_path):
    path, saved_params, _ = weights_file(tmp_path, 10, seed=1)
    fresh_params, fresh_state = random_variables(
        nets.transformed("resnet18", num_classes=10), jnp.zeros((1, SIZE, SIZE, 3)), seed=2)
    source = weight_sources.read(path)
    kept = transfer.merge(fresh_params, fresh_state, source, head="resnet/fc")
    reset = transfer.merge(fresh_params, fresh_state, source, head="resnet/fc", reset_head=True)
    np.testing.assert_array_equal(kept.params["resnet/fc"]["w"], saved_params["resnet/fc"]["w"])
    np.testing.assert_array_equal(reset.params["resnet/fc"]["w"], fresh_params["resnet/fc"]["w"])
    np.testing.assert_array_equal(reset.params["resnet/conv1"]["w"],
                                  saved_params["resnet/conv1"]["w"])
    assert (kept.head_fresh, reset.head_fresh) == (None, "reset_head")


def test_resnet50_weights_start_a_gcnet_resnet50():
    """GCNet's fine-tuning: every ResNet-50 leaf fits; the GC blocks (stages 2-4) stay fresh;
    nothing of the source is left over. Shapes from eval_shape, zeros as the weights."""
    zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
    source = weight_sources.Source("resnet50", 1000, {},
                                   *map(zeros, nets.introspect.shapes("resnet50", 1000)), "r50")
    params, state = nets.introspect.shapes("gcnet_resnet50", 1000)
    loaded = transfer.merge(params, state, source, head="resnet/fc")
    assert loaded.missing and all("/gc/" in name for name in loaded.missing)
    assert {name.split("/")[2][:6] for name in loaded.missing} == {"layer2", "layer3", "layer4"}
    assert loaded.unexpected == [] and loaded.head_fresh is None
    assert loaded.loaded + len(loaded.missing) == loaded.total
    # The fresh leaves are left for the fresh init (loop: init_state's `prepare`) to fill.
    for module, leaves in loaded.params.items():
        assert all(isinstance(x, jax.ShapeDtypeStruct) == ("/gc/" in module)
                   for x in leaves.values()), module


def test_a_shape_mismatch_beyond_the_head_is_an_error_naming_the_leaf():
    params, state = nets.introspect.shapes("resnet18", 10)
    zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
    source = weight_sources.Source("resnet18", 10, {}, zeros(params), zeros(state),
                                   "a resnet18 file")
    source.params["resnet/layer2_0/conv1"]["w"] = np.zeros((3, 3, 64, 256), np.float32)
    with pytest.raises(ValueError, match="only the classifier resnet/fc may change shape") as e:
        transfer.merge(params, state, source, head="resnet/fc")
    assert "params/resnet/layer2_0/conv1/w: source (3, 3, 64, 256) vs model (3, 3, 64, 128)" in (
        str(e.value))


def test_a_freeze_pattern_matching_nothing_is_a_clear_error():
    params, state = nets.introspect.shapes("resnet18", 10)
    with pytest.raises(ValueError, match=r"\['layer9'\] match no module") as e:
        transfer.frozen_masks(("conv1", "layer9"), params, state)
    assert "bn1, conv1, fc, layer1_0" in str(e.value) and "'layer1_0.bn1'" in str(e.value)
    with pytest.raises(ValueError, match="not a regular expression"):
        transfer.frozen_masks(("layer1_[",), params, state)


def test_train_run_refuses_a_bad_freeze_before_reading_data(tmp_path):
    config = common.base()
    config.model, config.data.num_classes, config.data.train_size = "resnet18", 10, SIZE
    config.data.data_dir = str(tmp_path)    # no dataset there: the config error comes first
    config.freeze = ("stem",)
    with pytest.raises(loop.ConfigError, match=r"config.freeze: freeze pattern\(s\) \['stem'\]"):
        loop.run(config, str(tmp_path / "run"))


def test_sources_that_are_not_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file or training workdir"):
        weight_sources.read(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        weight_sources.read(tmp_path)
    path, _, _ = weights_file(tmp_path, 10, seed=1)
    with pytest.raises(ValueError, match="EMA option applies to training checkpoints"):
        weight_sources.read(path, ema=True)


def _init_from_config(path, model="resnet18", **fields):
    config = common.base()
    config.model, config.data.num_classes, config.data.train_size = model, 10, SIZE
    config.init_from = str(path)
    config.update(fields)
    return config


def _load(config):
    model = nets.transformed(config.model, num_classes=10)
    shapes = loop.Variables(*jax.eval_shape(loop._model_init(config, model), jax.random.key(0)))
    return loop._load_init_from(config, shapes)


@pytest.mark.parametrize("source", ["resnet34", "mobilenet_v1_025"])
def test_weights_of_another_model_are_refused_unless_asked_for(tmp_path, source):
    """Reproduces ResNet-34 weights loading "102 of 102" into a ResNet-18 (a depth-truncated
    copy) and MobileNet weights loading "0 of 102" and training from scratch: both refused; with
    init_from_any_model the ResNet-34 arrays that fit load, and a source of which nothing fits
    is still an error."""
    f = nets.transformed(source, num_classes=10)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True),
                                   jnp.zeros((1, SIZE, SIZE, 3)))
    path = tmp_path / f"{source}.safetensors"
    nets.weights.save(path, *(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
                              for t in (params, state)), model=source)
    with pytest.raises(loop.ConfigError, match=f"it holds {source} weights and this run builds "
                                               "resnet18; set config.init_from_any_model=True"):
        _load(_init_from_config(path))
    if source == "resnet34":
        loaded = _load(_init_from_config(path, init_from_any_model=True)).loaded
        assert loaded.loaded == 102 and len(loaded.unexpected) > 0   # blocks 2+ of each stage
    else:
        with pytest.raises(loop.ConfigError, match="none of its arrays fits resnet18"):
            _load(_init_from_config(path, init_from_any_model=True))


def test_a_detector_starts_from_its_backbone_classifiers_weights(tmp_path):
    """efficientnet_b0 weights (the registry row's `backbone`) given as init_from to an
    efficientdet_d0 run fill its backbone, BN statistics included; the classifier's top and head
    are reported unexpected, the BiFPN and the heads stay fresh and are listed as such."""
    assert nets.model_info("efficientdet_d0").backbone == "efficientnet_b0"
    classifier = nets.transformed("efficientnet_b0")
    params, state = random_variables(classifier, jnp.zeros((1, 64, 64, 3)), seed=3)
    path = tmp_path / "b0.safetensors"
    nets.weights.save(path, params, state, model="efficientnet_b0")
    config = _init_from_config(path)
    config.model, config.data.train_size = "efficientdet_d0", 64
    model = nets.transformed(config.model, num_classes=10)
    shapes = loop.Variables(*jax.eval_shape(loop._model_init(config, model), jax.random.key(0)))
    loaded = loop._load_init_from(config, shapes).loaded

    ours = {module_path(m): m for tree in (shapes.params, shapes.state) for m in tree}
    backbone = [m for m in ours if m.startswith("backbone.")]
    for collection, tree, saved in (("params", loaded.params, params),
                                    ("state", loaded.state, state)):
        for module, leaves in saved.items():
            target = ours.get(f"backbone.{module_path(module)}")
            for leaf, value in leaves.items():
                if target is None:   # the classifier's top conv and head
                    assert f"{collection}/{module}/{leaf}" in loaded.unexpected
                else:
                    np.testing.assert_array_equal(tree[target][leaf], value)
    assert loaded.loaded == sum(len(shapes.params.get(ours[m], {})) +
                                len(shapes.state.get(ours[m], {})) for m in backbone)
    assert loaded.missing and all(module_path(n.split("/", 1)[1].rsplit("/", 1)[0])
                                  .startswith(("fpn", "class_net", "box_net"))
                                  for n in loaded.missing)


def test_bn_eval_normalises_with_the_running_statistics_and_keeps_them():
    """nets.transformed(..., bn_eval=True) (config.bn_eval): a training-mode forward equals the
    eval-mode one and leaves the BatchNorm statistics as they were."""
    images = jnp.asarray(np.random.RandomState(0).randn(2, SIZE, SIZE, 3), jnp.float32)
    plain = nets.transformed("resnet18", num_classes=10)
    params, state = random_variables(plain, images)
    frozen = nets.transformed("resnet18", num_classes=10, bn_eval=True)
    train_out, train_state = frozen.apply(params, state, None, images, is_training=True)
    eval_out, _ = plain.apply(params, state, None, images, is_training=False)
    np.testing.assert_allclose(train_out, eval_out, rtol=1e-5, atol=1e-5)
    for name, value in flat(train_state).items():
        np.testing.assert_array_equal(value, flat(state)[name], err_msg=name)
    batch_out, _ = plain.apply(params, state, None, images, is_training=True)
    assert np.abs(np.asarray(batch_out) - np.asarray(eval_out)).max() > 1e-2


def test_converted_effdet_weights_start_a_detector_for_other_classes(tmp_path):
    """effdet's tf_efficientdet_d0 state dict (90 COCO classes) as init_from of a 10-class
    efficientdet_d0 run: everything loads but the class net's predict conv, whose outputs are
    per class and which keeps its fresh init, said in the summary."""
    from tests import reference

    torch, effdet = reference.torch(), reference.effdet()
    model = effdet.create_model("tf_efficientdet_d0", pretrained=False,
                                pretrained_backbone=False)
    path = tmp_path / "d0.pth"
    torch.save(model.state_dict(), path)
    config = _init_from_config(path, model="efficientdet_d0")
    config.data.train_size = 64
    shapes = loop.Variables(*jax.eval_shape(
        loop._model_init(config, nets.transformed("efficientdet_d0", num_classes=10)),
        jax.random.key(0)))
    loaded = loop._load_init_from(config, shapes).loaded
    head = nets.head_module("efficientdet_d0")
    assert head.endswith("class_net/predict/conv_pw")
    # 9 anchors x 90 classes in the file, 9 x 10 here
    assert loaded.head_fresh == f"{head}/w is (1, 1, 64, 810) in the source, (1, 1, 64, 90) here"
    assert loaded.missing == [] and loaded.unexpected == []
    assert loaded.loaded == loaded.total - 2    # the head's weight and bias
    state_dict = model.state_dict()
    np.testing.assert_array_equal(
        loaded.params[head.replace("conv_pw", "conv_dw")]["w"][..., 0, :],
        state_dict["class_net.predict.conv_dw.weight"].numpy()[:, 0].transpose(1, 2, 0))
