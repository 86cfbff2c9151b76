"""The device path of the train batch (data.augment_on_device, data/device_augment.py): every
RandAugment op, the mixing and the normalisation equal the NumPy path's bit for bit on XLA:CPU,
from the same draws; its batches do not depend on the number of hosts."""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
import pytest

from data import classification, device_augment, sampler
from data import randaugment as ra

SIZE = 24


def random_images(count, height, width, seed=0):
    """Noise over smooth gradients: every op (equalize's histogram, auto-contrast's range,
    sharpness' smoothing) has something to change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        base = rng.uniform(0, 200) * (y / height) + rng.uniform(0, 55) * (x / width)
        noise = rng.integers(0, rng.integers(1, 60), (height, width, 3))
        images.append(np.clip(base[:, :, None] + noise, 0, 255).astype(np.uint8))
    return np.stack(images)


@functools.cache
def device_randaugment(magnitude):
    return jax.jit(jax.vmap(functools.partial(device_augment.randaugment,
                                              magnitude=magnitude)))


@pytest.mark.parametrize("magnitude", [5.0, 15.0])
def test_every_op_equals_the_numpy_op_from_the_same_draws(magnitude):
    """`randaugment.plan` draws what `randaugment.randaugment` draws from a generator; applied
    on the device, every layer gives the NumPy images exactly."""
    layers, count = 2, 48
    images = random_images(count, SIZE, SIZE)
    plans = [ra.plan(np.random.default_rng(seed), layers, magnitude, SIZE, SIZE)
             for seed in range(count)]
    ops = np.stack([p[0] for p in plans])
    args = np.stack([p[1] for p in plans]).astype(np.float32)
    assert set(ops.ravel()) == set(range(len(ra.OP_NAMES)))   # every op, at least once
    expected = np.stack([ra.randaugment(image, np.random.default_rng(seed), layers, magnitude)
                         for seed, image in enumerate(images)])
    got = np.asarray(device_randaugment(magnitude)(images, ops, args))
    for i in range(count):
        names = [ra.OP_NAMES[k] for k in ops[i]]
        np.testing.assert_array_equal(got[i], expected[i], err_msg=f"image {i}: {names}")


def test_the_ops_that_can_leave_an_image_unchanged_do_so_on_the_device():
    """Flat channels (auto-contrast, equalize leave them), M = 10 (solarize's threshold 256)."""
    flat = np.full((1, SIZE, SIZE, 3), 77, np.uint8)
    for name in ("AutoContrast", "Equalize", "Solarize"):
        ops = np.array([[ra.OP_NAMES.index(name)]], np.int32)
        out = device_randaugment(10.0)(flat, ops, np.zeros((1, 1, ra.PLAN_ARGS), np.float32))
        np.testing.assert_array_equal(np.asarray(out), flat, err_msg=name)


def recipe(**overrides):
    cfg = dict(
        train_size=SIZE, test_size=SIZE, eval_preprocess="resize_crop_32", crop_fraction=0.875,
        image_ops="tf", interpolation="bicubic", mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375), random_resized_crop=True, min_area=0.08, flip=True,
        mixup_alpha=0.0, cutmix=False, randaugment_layers=0, randaugment_magnitude=0.0,
        augment_before_mix=False, num_classes=10)
    cfg.update(overrides)
    return classification.Recipe.from_config(ml_collections.ConfigDict(cfg))


SOURCE = [{"image": image, "label": i % 10}
          for i, image in enumerate(random_images(40, 40, 52, seed=1))]
RECIPES = {
    "nfnet": dict(mixup_alpha=0.2, cutmix=True, randaugment_layers=4,
                  randaugment_magnitude=15.0),        # RandAugment on the mixed rows
    "before_mix": dict(mixup_alpha=0.2, cutmix=True, randaugment_layers=2,
                       randaugment_magnitude=9.0, augment_before_mix=True),
    "efficientnet": dict(randaugment_layers=2, randaugment_magnitude=10.0),   # no mixing
    "mixing_only": dict(mixup_alpha=0.4, cutmix=True),
    "plain": dict(image_ops="torchvision", interpolation="bilinear"),
}


def batch_maker(overrides, *, on_device, process_index=0, process_count=1, batch=8):
    return classification.TrainBatchMaker(
        SOURCE, recipe(**overrides, augment_on_device=on_device),
        sampler.Sharding(batch, process_index, process_count), seed=3)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_device_path_gives_the_numpy_paths_batches(name):
    overrides = RECIPES[name]
    cfg = dataclasses.asdict(recipe(**overrides, augment_on_device=True))
    finish = jax.jit(classification.device_preparer(ml_collections.ConfigDict(cfg)))
    for step in (0, 5):
        host = batch_maker(overrides, on_device=False)(step)
        device = batch_maker(overrides, on_device=True)(step)
        assert device["images"].shape[:2] == (8, 2 if "mixup_alpha" in overrides else 1)
        finished = finish(device)
        np.testing.assert_array_equal(device["targets"], host["targets"])
        np.testing.assert_array_equal(np.asarray(finished["targets"]), host["targets"])
        np.testing.assert_array_equal(np.asarray(finished["images"]), host["images"],
                                      err_msg=f"{name}, step {step}")


def test_device_batches_do_not_depend_on_the_number_of_hosts():
    overrides = RECIPES["nfnet"]
    whole = batch_maker(overrides, on_device=True)(2)
    halves = [batch_maker(overrides, on_device=True, process_index=i, process_count=2)(2)
              for i in range(2)]
    assert set(whole) == {"images", "targets", sampler.UNREADABLE, *device_augment.PLAN_KEYS}
    for key in set(whole) - {sampler.UNREADABLE}:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key],
                                      err_msg=key)
