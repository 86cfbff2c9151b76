"""The input pipeline: built-in dataset, sources, augmentation, sharding, resumption, eval."""

import json
import math
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import data
from data import augment, builtin, pipeline, sources

GLOBAL_BATCH = 64


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    data.prepare_builtin(directory)
    return str(directory)


def make_cfg(data_dir, **overrides):
    cfg = ml_collections.ConfigDict(dict(
        name="sklearn_digits", data_dir=data_dir, train_split="train", eval_split="test",
        num_classes=10, train_size=32, test_size=32, eval_preprocess="resize_crop_32",
        crop_fraction=0.875, interpolation="bicubic", mean=(123.675, 116.28, 103.53),
        std=(58.395, 57.12, 57.375), random_resized_crop=True, min_area=0.08, flip=True,
        mixup_alpha=0.0, cutmix=False, randaugment_layers=0, randaugment_magnitude=0.0,
        workers=0,
    ))
    cfg.update(overrides)
    return cfg


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


# The built-in dataset and sources.


def test_builtin_dataset_is_read_from_files_without_tensorflow(digits_dir):
    # A fresh process that never imports data.builtin: TFDS finds the dataset from its files.
    script = (
        "import sys, numpy as np, tensorflow_datasets as tfds\n"
        f"splits = {{s: tfds.data_source('sklearn_digits', data_dir={digits_dir!r}, split=s)"
        " for s in ('train', 'test')}\n"
        "for name, split in splits.items():\n"
        "    examples = [split[i] for i in range(len(split))]\n"
        "    images = np.stack([e['image'] for e in examples])\n"
        "    labels = sorted({int(e['label']) for e in examples})\n"
        "    print(name, len(split), images.shape, images.dtype, labels)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    labels = list(range(10))
    assert result.stdout.splitlines() == [
        f"train 1437 (1437, 32, 32, 3) uint8 {labels}",
        f"test 360 (360, 32, 32, 3) uint8 {labels}",
        "False",
    ]


def test_builtin_images_are_the_sklearn_digits(digits_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    test = sources.open_source("sklearn_digits", "test", digits_dir)
    # TFDS stores examples in hashed-key order; compare as sets of (image bytes, label).
    stored = {(test[i]["image"].tobytes(), int(test[i]["label"])) for i in range(len(test))}
    expected = {(np.asarray(builtin.digit_to_image(digits.images[i])).tobytes(),
                 int(digits.target[i])) for i in builtin.split_indices(len(digits.target), "test")}
    assert stored == expected
    image = np.asarray(builtin.digit_to_image(digits.images[0]))
    assert np.array_equal(image[..., 0], image[..., 2]) and image.max() > 200


def test_prepare_builtin_concurrently(tmp_path):
    script = f"import data; data.prepare_builtin({str(tmp_path)!r})"
    processes = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
                 for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr.decode()
    assert sources.num_examples("sklearn_digits", "train", str(tmp_path)) == 1437


def test_data_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert sources.data_dir("") == sources.data_dir(None) == str(tmp_path)
    assert sources.data_dir("/x/y") == "/x/y"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert sources.data_dir("").endswith("tensorflow_datasets")


def test_missing_dataset_error_says_how_to_get_it(tmp_path):
    cfg = make_cfg(str(tmp_path), name="imagenet2012:5.1.0", num_classes=1000)
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.train_iterator(cfg, global_batch=8, seed=0)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    for part in ("imagenet2012", str(tmp_path), "--file_format=array_record", "downloads/manual",
                 ":local"):
        assert part in message
    with pytest.raises(data.DatasetNotFoundError, match="no_such_dataset"):
        sources.open_source("no_such_dataset", "train", str(tmp_path))
    assert "tensorflow" not in sys.modules


def test_sizes_and_classes(digits_dir):
    cfg = make_cfg(digits_dir)
    assert data.num_train_examples(cfg) == 1437
    assert sources.num_examples("sklearn_digits", "test", digits_dir) == 360
    assert sources.num_classes("sklearn_digits", digits_dir) == 10


# Train batches: sharding, epochs, resumption.


def test_train_batches_shapes_and_targets(digits_dir):
    iterator = data.train_iterator(make_cfg(digits_dir), global_batch=GLOBAL_BATCH, seed=0)
    batch = next(iterator)
    assert batch["images"].shape == (GLOBAL_BATCH, 32, 32, 3)
    assert batch["images"].dtype == batch["targets"].dtype == np.float32
    assert batch["targets"].shape == (GLOBAL_BATCH, 10)
    assert set(np.unique(batch["targets"])) == {0.0, 1.0}
    assert iterator.num_examples == 1437 and iterator.steps_per_epoch == 1437 // GLOBAL_BATCH
    # Normalised: roughly centred on the digits' black background, not raw pixels.
    assert -3 < batch["images"].min() < -1.5 and batch["images"].max() < 3
    json.dumps(iterator.get_state())


def test_two_processes_concatenate_to_one(digits_dir):
    cfg = make_cfg(digits_dir)
    steps_per_epoch = 1437 // GLOBAL_BATCH
    # Starting one step before an epoch ends covers the reshuffle too.
    start = {"step": steps_per_epoch - 1, "seed": 3, "global_batch": GLOBAL_BATCH}
    shards = []
    for process_index in range(3):
        if process_index == 2:
            iterator = data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=3)
        else:
            iterator = data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=3,
                                           process_index=process_index, process_count=2)
        iterator.set_state(start)
        shards.append(take(iterator, 2))
    (first, second, whole) = shards
    for step in range(2):
        for key in ("images", "targets"):
            assert first[step][key].shape[0] == GLOBAL_BATCH // 2
            joined = np.concatenate([first[step][key], second[step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])


def test_epoch_permutation_covers_split_once(digits_dir):
    num_examples, steps_per_epoch = 1437, 1437 // GLOBAL_BATCH
    seen = {0: [], 1: []}
    for process_index in (0, 1):
        sharding = pipeline.Sharding(GLOBAL_BATCH, process_index, 2)
        for step in range(steps_per_epoch):
            _, indices = pipeline.train_example_indices(7, step, sharding, num_examples)
            seen[process_index].extend(indices.tolist())
    everything = seen[0] + seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert len(everything) == len(set(everything)) == steps_per_epoch * GLOBAL_BATCH
    assert set(everything) <= set(range(num_examples))
    # The next epoch draws a new permutation.
    sharding = pipeline.Sharding(GLOBAL_BATCH, 0, 1)
    _, first = pipeline.train_example_indices(7, 0, sharding, num_examples)
    _, next_epoch = pipeline.train_example_indices(7, steps_per_epoch, sharding, num_examples)
    assert not np.array_equal(first, next_epoch)


def test_batches_hold_the_permuted_examples(digits_dir):
    cfg = make_cfg(digits_dir, random_resized_crop=False, flip=False)
    sharding = pipeline.Sharding(GLOBAL_BATCH, 1, 2)
    iterator = data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=5, process_index=1,
                                   process_count=2)
    iterator.set_state({"step": 4, "seed": 5, "global_batch": GLOBAL_BATCH})
    batch = next(iterator)
    _, indices = pipeline.train_example_indices(5, 4, sharding, 1437)
    source = sources.open_source("sklearn_digits", "train", digits_dir)
    recipe = pipeline.Recipe.from_config(cfg)
    expected = np.stack([pipeline._eval_image(source[int(i)]["image"], recipe) for i in indices])
    np.testing.assert_array_equal(batch["images"],
                                  augment.normalize(expected, cfg.mean, cfg.std))
    labels = [source[int(i)]["label"] for i in indices]
    np.testing.assert_array_equal(batch["targets"].argmax(1), labels)


def test_resume_continues_with_the_same_batches(digits_dir):
    cfg = make_cfg(digits_dir, mixup_alpha=0.2, cutmix=True)
    original = data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=1)
    take(original, 3)
    state = json.loads(json.dumps(original.get_state()))
    expected = take(original, 2)
    resumed = data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=1)
    resumed.set_state(state)
    assert_batches_equal(expected, take(resumed, 2))
    with pytest.raises(ValueError, match="seed"):
        data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=2).set_state(state)


def test_seed_determines_batches(digits_dir):
    cfg = make_cfg(digits_dir, mixup_alpha=0.2, cutmix=True)
    first, again, other = (next(data.train_iterator(cfg, global_batch=16, seed=seed))
                           for seed in (0, 0, 1))
    assert_batches_equal([first], [again])
    assert not np.array_equal(first["images"], other["images"])


def test_worker_processes_give_the_same_batches(digits_dir):
    threads = data.train_iterator(make_cfg(digits_dir), global_batch=16, seed=0)
    workers = data.train_iterator(make_cfg(digits_dir, workers=1), global_batch=16, seed=0)
    assert_batches_equal(take(threads, 2), take(workers, 2))
    workers.close()


def test_config_errors(digits_dir):
    with pytest.raises(NotImplementedError, match="randaugment_layers=0"):
        data.train_iterator(make_cfg(digits_dir, randaugment_layers=2), global_batch=8, seed=0)
    with pytest.raises(ValueError, match="divisible"):
        data.train_iterator(make_cfg(digits_dir), global_batch=9, seed=0, process_count=2)
    with pytest.raises(ValueError, match="classes"):
        data.train_iterator(make_cfg(digits_dir, num_classes=5), global_batch=8, seed=0)


# Eval batches.


def test_eval_counts_every_example_once_in_order(digits_dir):
    cfg = make_cfg(digits_dir)
    global_batch = 100  # 360 examples: the last global batch is 60 real rows and 40 padding.
    whole = list(data.eval_batches(cfg, global_batch=global_batch))
    shards = [list(data.eval_batches(cfg, global_batch=global_batch, process_index=p,
                                     process_count=2)) for p in (0, 1)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 4
    for step, batch in enumerate(whole):
        assert batch["images"].shape == (global_batch, 32, 32, 3)
        assert batch["images"].dtype == np.float32
        assert batch["labels"].dtype == np.int32 and batch["mask"].dtype == bool
        for key in batch:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
    mask = np.concatenate([b["mask"] for b in whole])
    assert mask.sum() == 360 and mask[:360].all()
    assert [int(b["mask"].sum()) for b in shards[1]] == [50, 50, 50, 10]
    source = sources.open_source("sklearn_digits", "test", digits_dir)
    labels = np.concatenate([b["labels"] for b in whole])[:360]
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(360)])
    assert not whole[-1]["images"][60:].any()


# Augmentation.


@pytest.mark.parametrize("min_area", [0.08, 0.5])
def test_random_resized_crop_box_ranges(min_area):
    rng = np.random.default_rng(0)
    height, width = 200, 300
    for _ in range(300):
        top, left, crop_height, crop_width = augment.random_resized_crop_box(
            rng, height, width, min_area)
        assert 0 <= top <= height - crop_height
        assert 0 <= left <= width - crop_width
        # Rounding to whole pixels moves area and aspect by at most about a pixel's worth.
        area = crop_height * crop_width / (height * width)
        assert min_area - 0.01 <= area <= 1.0
        assert 3 / 4 - 0.02 <= crop_width / crop_height <= 4 / 3 + 0.02


def test_random_resized_crop_falls_back_to_centre():
    # A 10x100 strip admits no crop of area >= 0.9 with aspect <= 4/3: centre crop at 4/3.
    box = augment.random_resized_crop_box(np.random.default_rng(0), 10, 100, min_area=0.9)
    assert box == (0, 43, 10, 13)
    image = np.random.default_rng(0).integers(0, 256, (10, 100, 3), dtype=np.uint8)
    out = augment.random_resized_crop(image, np.random.default_rng(0), 24, 0.9, "bilinear")
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_flip_is_an_involution():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert not np.array_equal(augment.flip(image), image)
    np.testing.assert_array_equal(augment.flip(augment.flip(image)), image)
    flips = {augment.random_flip(image, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert flips == {image.tobytes(), augment.flip(image).tobytes()}


def test_eval_preprocess_shapes():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for method in augment.EVAL_PREPROCESSORS:
        out = augment.eval_preprocess(image, method, 32, 0.875, "bicubic")
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # Shorter side 50 -> round(32 / 0.875) = 37, so width 70 -> 52; the crop is its centre.
    resized = augment.resize(image, 37, 52, "bicubic")
    np.testing.assert_array_equal(augment.resize_shorter_crop(image, 32, 0.875, "bicubic"),
                                  resized[2:34, 10:42])
    np.testing.assert_array_equal(augment.resize_crop_32(image, 32, "bilinear"),
                                  augment.resize(image, 64, 64, "bilinear")[16:48, 16:48])
    gray = augment.to_rgb(image[:, :, :1])
    assert gray.shape == (50, 70, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_normalize_and_one_hot():
    images = np.full((1, 2, 2, 3), 128, np.uint8)
    out = augment.normalize(images, (128.0, 0.0, 64.0), (1.0, 2.0, 64.0))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0, 0], [0.0, 64.0, 1.0])
    np.testing.assert_array_equal(augment.one_hot([2, 0], 3), [[0, 0, 1], [1, 0, 0]])


def test_mixup_targets():
    images = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    targets = augment.one_hot([0, 1, 2, 3], 5)
    mixed, mixed_targets, lam = augment.mixup(images, targets, np.random.default_rng(1), 0.2)
    assert 0 <= lam <= 1 and mixed.dtype == np.float32 and mixed_targets.dtype == np.float32
    np.testing.assert_allclose(mixed_targets.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed_targets[0], [lam, 0, 0, 1 - lam, 0], rtol=1e-6)
    np.testing.assert_allclose(mixed[0], lam * images[0] + (1 - lam) * images[3], rtol=1e-5)


def test_cutmix_box_area_is_one_minus_lambda():
    height, width = 20, 30
    # Image i is constant i, so the pixels of image 0 equal to 3 came from its partner.
    images = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None, None],
                             (4, height, width, 3)).copy()
    targets = augment.one_hot([0, 1, 2, 3], 4)
    lams = []
    for seed in range(30):
        mixed, mixed_targets, lam = augment.cutmix(images, targets, np.random.default_rng(seed))
        lams.append(lam)
        pasted = (mixed[0, :, :, 0] == 3).mean()
        assert pasted == pytest.approx(1 - lam)
        np.testing.assert_allclose(mixed_targets[0], [lam, 0, 0, 1 - lam], rtol=1e-6)
        np.testing.assert_allclose(mixed_targets.sum(1), 1.0, rtol=1e-6)
        top, left, box_height, box_width = augment.cutmix_box(np.random.default_rng(seed),
                                                              height, width)
        assert 0 <= top <= top + box_height <= height and 0 <= left <= left + box_width <= width
    assert min(lams) < 0.5 < max(lams)


def test_mix_batch_mixup_first_half_cutmix_second():
    images = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None, None],
                             (8, 16, 16, 3)).copy()
    targets = augment.one_hot(np.arange(8), 8)
    mixed, mixed_targets = augment.mix_batch(images, targets, np.random.default_rng(0), 0.5,
                                             True)
    np.testing.assert_allclose(mixed_targets.sum(1), 1.0, rtol=1e-6)
    # MixUp pairs rows 0-3 among themselves, CutMix rows 4-7.
    assert (mixed_targets[:4, 4:] == 0).all() and (mixed_targets[4:, :4] == 0).all()
    assert len(np.unique(mixed[0])) == 1  # MixUp blends whole images ...
    assert set(np.unique(mixed[4])) <= {4.0, 7.0}  # ... CutMix pastes pixels.
    lam = mixed_targets[0, 0]
    assert math.isclose(mixed[0, 0, 0, 0], lam * 0 + (1 - lam) * 3, rel_tol=1e-5)
