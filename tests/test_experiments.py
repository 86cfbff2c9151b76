"""Every experiment config loads, names a registered model with overrides it accepts, and the
paper recipes carry the paper's numbers."""

import importlib
import pathlib

import jax
import pytest

import nets
from experiments import common
from tests.helpers import reference_figures
from training import optimizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Experiments define get_config; the shared recipe modules (common, nfnet, ...) do not.
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py")
                     if "def get_config" in p.read_text())


def load(name, arg=None):
    return importlib.import_module(f"experiments.{name}").get_config(arg)


def test_the_recipes_exist():
    assert {f"nfnet_f{k}" for k in range(8)} | {"resnet50", "resnet18", "efficientnet_b0",
                                                "mobilenet_v2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "local"])
def test_config_is_complete_and_buildable(name, arg):
    config = load(name, arg)
    assert set(config.keys()) == set(common.base().keys())
    assert set(config.data.keys()) == set(common.base().data.keys())
    assert set(config.optimizer.keys()) == set(common.base().optimizer.keys())
    info = nets.model_info(config.model)
    nets.check_overrides(info, config.model_kwargs.to_dict())
    if arg == "local":
        if info.task in ("detection", "keypoints"):   # digits pasted on 128 px canvases
            assert config.data.name == "sklearn_digits_detection"
            assert config.data.train_size == 128
        else:
            assert config.data.name == "sklearn_digits" and config.data.train_size <= 64
        assert config.data.num_classes == 10 and config.data.randaugment_layers == 0
        assert config.model == load(name).model       # the architecture is kept


@pytest.mark.parametrize("k", range(8))
def test_nfnet_recipe_is_the_papers(k):
    """The official code's recipe (tests/reference/nfnet_official.json: its variant table and
    its training recipe, the same for every variant)."""
    official = reference_figures("nfnet_official.json")
    variant, r = official["variant_table"]["variants"][f"F{k}"], official["recipe"]
    c = load(f"nfnet_f{k}")
    assert c.model == f"nfnet_f{k}" and load(f"nfnet_f{k}", "plus").model == f"nfnet_f{k}plus"
    assert (c.batch_size, c.num_epochs, c.label_smoothing, c.ema_decay) == (
        r["batch_size"], r["epochs"], r["label_smoothing"], r["ema_decay"])
    assert (c.data.train_size, c.data.test_size) == (variant["train_px"], variant["test_px"])
    assert c.model_kwargs.drop_rate == variant["dropout"]
    assert c.model_kwargs.stochastic_depth_rate == r["stochastic_depth_rate"]
    assert (c.data.mixup_alpha, c.data.cutmix) == (r["mixup_alpha"], r["cutmix"])
    assert (c.data.randaugment_layers, c.data.randaugment_magnitude) == (
        variant["randaugment_layers"], variant["randaugment_magnitude"])
    assert (c.data.eval_preprocess, c.data.interpolation) == ("resize_crop_32", "bicubic")
    assert c.compute_dtype == "auto"
    o = c.optimizer
    assert (o.name, o.momentum, o.nesterov, o.weight_decay, o.agc_clipping) == (
        "sgd_agc", r["momentum"], r["nesterov"], r["weight_decay"], r["agc_clipping"])
    assert set(o.decay_roles) == {"weight", "classifier_weight"}

    # Peak 1.6 at batch 4096, linear warm-up over 5 epochs from 0, cosine to 0.
    assert r["imagenet_train_examples"] == common.IMAGENET_TRAIN_EXAMPLES
    steps_per_epoch = common.IMAGENET_TRAIN_EXAMPLES / c.batch_size
    total = int(common.IMAGENET_TRAIN_EXAMPLES * c.num_epochs // c.batch_size)
    assert total == r["training_steps"]
    lr = optimizers.learning_rate(o, c.batch_size, steps_per_epoch, total)
    warmup = r["warmup_epochs"] * steps_per_epoch
    assert float(lr(0)) == 0.0
    assert float(lr(warmup)) == pytest.approx(r["peak_lr"], rel=1e-6)
    assert float(lr(warmup / 2)) == pytest.approx(r["peak_lr"] / 2, rel=1e-6)
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-6)


def test_resnet50_recipe_is_torchvisions():
    c = load("resnet50")
    o = c.optimizer
    assert (c.batch_size, c.num_epochs, o.base_lr, o.momentum, o.weight_decay) == (
        256, 90, 0.1, 0.9, 1e-4)
    lr = optimizers.learning_rate(o, c.batch_size, 100.0, 9000)
    assert [float(lr(s)) for s in (0, 2999, 3000, 5999, 6000, 8999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_efficientnet_b0_recipe_is_the_papers():
    c = load("efficientnet_b0")
    o = c.optimizer
    assert (c.model, c.batch_size, c.num_epochs, c.label_smoothing, c.ema_decay) == (
        "efficientnet_b0", 4096, 350, 0.1, 0.9999)
    assert (c.model_kwargs.drop_connect_rate, c.model_kwargs.dropout_rate) == (0.2, 0.2)
    assert (o.name, o.rms_decay, o.momentum, o.rms_eps, o.weight_decay) == (
        "rmsprop", 0.9, 0.9, 1e-3, 1e-5)
    assert (c.data.image_ops, c.data.eval_preprocess, c.data.interpolation) == (
        "tf", "crop_resize", "bicubic")
    assert (c.data.randaugment_layers, c.data.randaugment_magnitude) == (2, 10.0)
    # The paper: initial lr 0.256 (at batch 4096), x0.97 every 2.4 epochs, after 5 warm-up
    # epochs; the stairs count from step 0 as the official schedule does.
    steps_per_epoch = common.IMAGENET_TRAIN_EXAMPLES / c.batch_size
    lr = optimizers.learning_rate(o, c.batch_size, steps_per_epoch, 100_000)
    assert float(lr(0)) == 0.0
    assert float(lr(2.5 * steps_per_epoch)) == pytest.approx(0.128, rel=1e-5)
    assert float(lr(5 * steps_per_epoch + 1)) == pytest.approx(0.256 * 0.97 ** 2, rel=1e-5)
    assert float(lr(24 * steps_per_epoch + 1)) == pytest.approx(0.256 * 0.97 ** 10, rel=1e-5)
    params = jax.eval_shape(lambda: nets.transformed("efficientnet_b0", 10).init(
        jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), is_training=True))[0]
    tx = optimizers.optimizer(o, "efficientnet_b0", params, lr)
    assert jax.eval_shape(tx.init, params)  # the chain builds over the model's roles


def test_mobilenet_v2_recipe_is_torchvisions():
    c = load("mobilenet_v2")
    o = c.optimizer
    assert (c.model, c.batch_size, c.num_epochs, o.base_lr, o.weight_decay) == (
        "mobilenet_v2", 256, 300, 0.045, 4e-5)
    lr = optimizers.learning_rate(o, c.batch_size, 100.0, 30_000)
    assert [float(lr(s)) for s in (0, 99, 100, 250)] == pytest.approx(
        [0.045, 0.045, 0.045 * 0.98, 0.045 * 0.98 ** 2])


def test_decay_roles_select_parameters():
    params = jax.eval_shape(lambda: nets.transformed("resnet18", 10).init(
        jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3)), is_training=True))[0]
    c = load("resnet50")
    c.optimizer.decay_roles = ("weight", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        optimizers.optimizer(c.optimizer, "resnet18", params, 0.1)


@pytest.mark.parametrize("key", ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d7x"])
def test_efficientdet_recipe_is_the_official_one(key):
    """efficientdet_spec.md §12-§13, written out from the official google/automl trainer."""
    import math

    from experiments.efficientdet import COCO_TRAIN_EXAMPLES
    from nets.efficientdet import ROWS

    c = load(f"efficientdet_{key}")
    size = ROWS[key][1]
    assert (c.task, c.model) == ("detection", f"efficientdet_{key}")
    assert (c.data.name, c.data.num_classes) == ("coco/2017", 90)
    assert (c.data.train_size, c.data.test_size) == (size, size)
    assert (c.data.scale_min, c.data.scale_max, c.data.flip) == (0.1, 2.0, True)
    assert (tuple(c.data.mean), tuple(c.data.std)) == (common.IMAGENET_MEAN,
                                                       common.IMAGENET_STD)
    assert c.batch_size == 128
    assert c.num_epochs == (600 if key in ("d7", "d7x") else 300)
    assert c.ema_decay == 0.9998 and c.label_smoothing == 0.0
    d = c.detection
    assert (d.focal_alpha, d.focal_gamma, d.huber_delta, d.box_loss_weight, d.iou_loss_type,
            d.nms) == (0.25, 1.5, 0.1, 50.0, "", "gaussian")
    o = c.optimizer
    assert (o.name, o.momentum, o.nesterov) == ("sgd", 0.9, False)
    assert (o.base_lr, o.lr_batch_base) == (0.08, 64)
    assert o.weight_decay == 4e-5 and set(o.decay_roles) == {"weight", "classifier_weight"}
    assert (o.schedule, o.warmup_epochs, o.warmup_init) == ("cosine_global_step", 1.0, 0.008)
    assert o.grad_clip_norm == 10.0

    # The schedule the run builds: peak 0.08 * 128 / 64 = 0.16; a one-epoch warm-up from
    # 0.008 * 128 / 64 (the TF1 trainer scales the warm-up's start like the peak), then the
    # cosine on the global step over T - W.
    steps_per_epoch = COCO_TRAIN_EXAMPLES / c.batch_size
    total = round(c.num_epochs * steps_per_epoch)
    lr = optimizers.learning_rate(o, c.batch_size, steps_per_epoch, total)
    warmup = steps_per_epoch
    assert float(lr(0)) == pytest.approx(0.016, rel=1e-6)
    assert float(lr(warmup / 2)) == pytest.approx((0.016 + 0.16) / 2, rel=1e-5)
    step = math.ceil(warmup)
    assert float(lr(step)) == pytest.approx(
        0.5 * 0.16 * (1 + math.cos(math.pi * step / (total - warmup))), rel=1e-5)
    assert float(lr(total - warmup)) == pytest.approx(0.0, abs=1e-6)


def test_efficientdet_weight_decay_reaches_conv_kernels_only():
    """4e-5 on variables named *kernel / *weight (every conv kernel, depthwise and pointwise,
    and the heads'), none on biases, BatchNorm or the BiFPN's fusion weights."""
    import numpy as np

    c = load("efficientdet_d0")
    c.optimizer.grad_clip_norm = 0.0   # the decay term alone
    shapes = nets.introspect.shapes("efficientdet_d0", 90)[0]
    params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
    zeros = jax.tree.map(np.zeros_like, params)
    tx = optimizers.optimizer(c.optimizer, "efficientdet_d0", params, lambda step: 1.0)
    updates, _ = tx.update(zeros, tx.init(params), params)
    decayed = {(m, leaf) for m in updates for leaf in updates[m]
               if np.any(np.asarray(updates[m][leaf]) != 0)}
    assert decayed == {(m, leaf) for m in params for leaf in params[m] if leaf == "w"}
    assert len(decayed) == 150
    np.testing.assert_allclose(updates["efficientdet/class_net/predict/conv_pw"]["w"], -4e-5,
                               rtol=1e-6)


def test_wrn_recipe_is_the_papers():
    """Zagoruyko & Komodakis 2016: batch 128, 200 epochs, SGD Nesterov 0.9, lr 0.1 x0.2 at
    epochs 60, 120, 160, weight decay 5e-4, dropout 0.3 for WRN-n-k-dropout; CIFAR-10."""
    c = load("wrn_28_10")
    o = c.optimizer
    assert (c.model, c.data.name, c.data.num_classes, c.data.train_size) == (
        "wrn_28_10", "cifar10", 10, 32)
    assert (c.batch_size, c.num_epochs, c.model_kwargs.dropout_rate) == (128, 200, 0.0)
    assert load("wrn_28_10", "dropout").model_kwargs.dropout_rate == 0.3
    # Random 32 px crops of the image padded by 4 px by reflection, and flips.
    assert (c.data.random_resized_crop, c.data.pad_crop, c.data.pad_fill, c.data.flip) == (
        False, 4, "reflect", True)
    assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.9, True, 5e-4)
    steps_per_epoch = 50_000 / c.batch_size
    lr = optimizers.learning_rate(o, c.batch_size, steps_per_epoch, 200 * steps_per_epoch)
    epochs = (0, 59.9, 60.1, 119.9, 120.1, 159.9, 160.1, 199)
    assert [float(lr(e * steps_per_epoch)) for e in epochs] == pytest.approx(
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])


def test_densenet_cifar_recipe_is_the_papers():
    """Huang et al. 2017: batch 64, 300 epochs, SGD Nesterov 0.9, lr 0.1 / 10 at 50% and 75%
    of the epochs, weight decay 1e-4, no dropout with augmentation; CIFAR-10."""
    c = load("densenet_bc_100_12")
    o = c.optimizer
    assert (c.model, c.data.name, c.data.num_classes, c.data.crop_fraction) == (
        "densenet_bc_100_12", "cifar10", 10, 1.0)
    assert (c.batch_size, c.num_epochs, c.model_kwargs.drop_rate) == (64, 300, 0.0)
    # C10+: 4 px translations (fb.resnet.torch zero-pads the normalised image: the mean colour).
    assert (c.data.random_resized_crop, c.data.pad_crop, c.data.pad_fill, c.data.flip) == (
        False, 4, "mean", True)
    assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.9, True, 1e-4)
    steps_per_epoch = 50_000 / c.batch_size
    lr = optimizers.learning_rate(o, c.batch_size, steps_per_epoch, 300 * steps_per_epoch)
    epochs = (0, 149.9, 150.1, 224.9, 225.1, 299)
    assert [float(lr(e * steps_per_epoch)) for e in epochs] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])

