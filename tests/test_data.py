"""The input pipeline: built-in dataset, sources, augmentation, sharding, resumption, eval."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import data
from data import augment, builtin, classification, decode, sampler, sources

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
        crop_fraction=0.875, image_ops="tf", interpolation="bicubic",
        mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), random_resized_crop=True,
        min_area=0.08, flip=True, mixup_alpha=0.0, cutmix=False, randaugment_layers=0,
        randaugment_magnitude=0.0, augment_before_mix=False, workers=0,
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
    stored = {(decode.decode(test[i]["image"]).tobytes(), int(test[i]["label"]))
              for i in range(len(test))}
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
    assert iterator.num_examples == 1437
    # Normalised: roughly centred on the digits' black background, not raw pixels.
    assert -3 < batch["images"].min() < -1.5 and batch["images"].max() < 3
    json.dumps(iterator.get_state())


# The NFNet recipe's augmentation, which reads two examples per row.
NFNET_AUGMENT = dict(mixup_alpha=0.2, cutmix=True, randaugment_layers=4,
                     randaugment_magnitude=15.0)


@pytest.mark.parametrize("augment", [{}, NFNET_AUGMENT], ids=["plain", "nfnet"])
def test_two_processes_concatenate_to_one(digits_dir, augment):
    cfg = make_cfg(digits_dir, **augment)
    steps_per_epoch = 1437 // (GLOBAL_BATCH * (2 if augment else 1))
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
        sharding = sampler.Sharding(GLOBAL_BATCH, process_index, 2)
        for step in range(steps_per_epoch):
            _, indices = sampler.stream_examples(7, step, sharding, num_examples)
            seen[process_index].extend(indices.tolist())
    everything = seen[0] + seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert len(everything) == len(set(everything)) == steps_per_epoch * GLOBAL_BATCH
    assert set(everything) <= set(range(num_examples))
    # The next epoch draws a new permutation.
    sharding = sampler.Sharding(GLOBAL_BATCH, 0, 1)
    _, first = sampler.stream_examples(7, 0, sharding, num_examples)
    _, next_epoch = sampler.stream_examples(7, steps_per_epoch, sharding, num_examples)
    assert not np.array_equal(first, next_epoch)
    # Rows that mix read two consecutive stream examples each: an epoch takes half the steps.
    positions, pairs = sampler.stream_examples(7, 1, sharding, num_examples, 2)
    np.testing.assert_array_equal(positions, np.arange(2 * GLOBAL_BATCH, 4 * GLOBAL_BATCH))
    np.testing.assert_array_equal(pairs, sampler.epoch_permutation(7, 0, num_examples)[
        2 * GLOBAL_BATCH:4 * GLOBAL_BATCH])
    _, wrapped = sampler.stream_examples(7, 1437 // (2 * GLOBAL_BATCH), sharding, num_examples,
                                          2)
    np.testing.assert_array_equal(wrapped, sampler.epoch_permutation(7, 1, num_examples)[
        :2 * GLOBAL_BATCH])


def test_batches_hold_the_permuted_examples(digits_dir):
    cfg = make_cfg(digits_dir, random_resized_crop=False, flip=False)
    sharding = sampler.Sharding(GLOBAL_BATCH, 1, 2)
    iterator = data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=5, process_index=1,
                                   process_count=2)
    iterator.set_state({"step": 4, "seed": 5, "global_batch": GLOBAL_BATCH})
    batch = next(iterator)
    _, indices = sampler.stream_examples(5, 4, sharding, 1437)
    source = sources.open_source("sklearn_digits", "train", digits_dir)
    recipe = classification.Recipe.from_config(cfg)
    expected = np.stack([classification.eval_image(source[int(i)]["image"], recipe)
                         for i in indices])
    np.testing.assert_array_equal(batch["images"], expected)
    labels = [source[int(i)]["label"] for i in indices]
    np.testing.assert_array_equal(batch["targets"].argmax(1), labels)


def test_pad_crop_translates_the_whole_image(digits_dir):
    """data.pad_crop: each train image is its eval image padded and cropped back (here by 2 px
    with zeros), at an offset drawn from the example's stream; with the random-resized crop it
    is a config error."""
    cfg = make_cfg(digits_dir, random_resized_crop=False, flip=False, pad_crop=2,
                   pad_fill="zeros")
    iterator = data.train_iterator(cfg, global_batch=GLOBAL_BATCH, seed=5)
    images = next(iterator)["images"]
    _, indices = sampler.stream_examples(5, 0, sampler.Sharding(GLOBAL_BATCH, 0, 1), 1437)
    source = sources.open_source("sklearn_digits", "train", digits_dir)
    recipe = classification.Recipe.from_config(cfg)
    moved = 0
    for image, i in zip(images, indices):
        whole = classification.eval_image(source[int(i)]["image"], recipe)
        black = augment.normalize(np.zeros(3, np.float32), recipe.mean, recipe.std)
        padded = np.pad(whole - black, ((2, 2), (2, 2), (0, 0))) + black
        crops = [(top, left) for top in range(5) for left in range(5)
                 if np.allclose(image, padded[top:top + 32, left:left + 32], atol=1e-5)]
        assert crops, "not a translation of the eval image"
        moved += crops != [(2, 2)]
    assert moved > GLOBAL_BATCH // 2
    with pytest.raises(ValueError, match="pad_crop.*random_resized_crop=False"):
        classification.Recipe.from_config(make_cfg(digits_dir, pad_crop=2))
    with pytest.raises(ValueError, match="pad_fill one of"):
        classification.Recipe.from_config(make_cfg(digits_dir, random_resized_crop=False,
                                                   pad_crop=2, pad_fill="edge"))


def test_resume_continues_with_the_same_batches(digits_dir):
    cfg = make_cfg(digits_dir, **NFNET_AUGMENT)
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


def test_worker_count():
    assert sampler.worker_count(0) == 0 and sampler.worker_count(3) == 3
    assert sampler.worker_count(-1) == os.cpu_count()
    with pytest.raises(ValueError, match="data.workers must be -1"):
        sampler.worker_count(-2)


def test_config_errors(digits_dir):
    with pytest.raises(ValueError, match="image_ops='tf' resizes bicubically"):
        data.train_iterator(make_cfg(digits_dir, interpolation="bilinear"), global_batch=8,
                            seed=0)
    with pytest.raises(ValueError, match="unknown data.image_ops 'pil'; choose from"):
        data.train_iterator(make_cfg(digits_dir, image_ops="pil"), global_batch=8, seed=0)
    with pytest.raises(ValueError, match=r"a step reads 1600 examples \(global batch 800 x 2"):
        data.train_iterator(make_cfg(digits_dir, cutmix=True), global_batch=800, seed=0)
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


# Mixing inside the pipeline, on images whose pixels say which example they are.


def constant_source(count, size=16):
    return [{"image": np.full((size, size, 3), 10 * i, np.uint8), "label": i}
            for i in range(count)]


def test_mixed_rows_pair_consecutive_stream_examples():
    cfg = make_cfg("", num_classes=20, image_ops="torchvision", interpolation="bilinear",
                   random_resized_crop=False, flip=False, mixup_alpha=0.2, cutmix=True,
                   mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), train_size=16, test_size=16)
    source = constant_source(20)
    sharding = sampler.Sharding(4, 1, 2)
    make_batch = classification.TrainBatchMaker(source, classification.Recipe.from_config(cfg),
                                                sharding, 3)
    kinds = set()
    for step in range(2):
        batch = make_batch(step)
        _, indices = sampler.stream_examples(3, step, sharding, 20, examples_per_row=2)
        for i, row in enumerate(sharding.global_positions(step)):
            first, second = indices[2 * i], indices[2 * i + 1]
            image, target = batch["images"][i], batch["targets"][i]
            lam = target[first]
            assert target.sum() == pytest.approx(1.0, abs=1e-6)
            assert target[second] == pytest.approx(1.0 - lam, abs=1e-6)
            if row % 2 == 0:    # MixUp: one blended value everywhere
                kinds.add("mixup")
                np.testing.assert_allclose(image, lam * 10 * first + (1 - lam) * 10 * second,
                                           rtol=1e-5)
            else:               # CutMix: a box of the first image on the second
                kinds.add("cutmix")
                from_first = image[:, :, 0] == 10 * first
                assert set(np.unique(image)) <= {10.0 * first, 10.0 * second}
                assert from_first.mean() == pytest.approx(lam)
                if from_first.any():
                    rows, cols = np.nonzero(from_first)
                    box = from_first[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
                    assert box.all()
    assert kinds == {"mixup", "cutmix"}


def test_randaugment_runs_after_mixing_by_default():
    def batch(**overrides):
        cfg = make_cfg("", num_classes=20, random_resized_crop=False, flip=False,
                       mixup_alpha=0.2, randaugment_layers=2, randaugment_magnitude=9.0,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **overrides)
        recipe = classification.Recipe.from_config(cfg)
        return classification.TrainBatchMaker(constant_source(20, 32), recipe,
                                        sampler.Sharding(2, 0, 1), 0)(0)["images"]

    after, before = batch(), batch(augment_before_mix=True)
    # RandAugment's uint8 output is whole numbers; MixUp afterwards blends them into fractions.
    assert np.array_equal(after, np.round(after))
    assert not np.array_equal(before, np.round(before))


# Other sources: a TFDS dataset of JPEGs read like ImageNet, and image folders.


def jpeg_bytes(value, size=(40, 30)):
    import io
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(value).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


TINY_EXAMPLES = 24


@pytest.fixture(scope="session")
def tiny_jpeg_dir(tmp_path_factory):
    """A TFDS dataset of JPEG images with one class per example, in array_record format."""
    import io

    import tensorflow_datasets as tfds
    from etils import epath

    class TinyJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        code_path = epath.Path(__file__)    # else TFDS looks it up with importlib_resources

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=TINY_EXAMPLES)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(TINY_EXAMPLES):
                # Encoded bytes are stored as they are, so no TensorFlow is needed.
                yield i, {"image": io.BytesIO(jpeg_bytes(i, (40 + i, 30))), "label": i}

    directory = tmp_path_factory.mktemp("tiny_tfds")
    TinyJpegs(data_dir=str(directory), file_format="array_record").download_and_prepare()
    return str(directory)


def test_tfds_jpeg_dataset_two_processes_and_resume(tiny_jpeg_dir):
    cfg = make_cfg(tiny_jpeg_dir, name="tiny_jpegs", num_classes=TINY_EXAMPLES, train_size=24)
    source = sources.open_source("tiny_jpegs", "train", tiny_jpeg_dir)
    assert isinstance(source[0]["image"], bytes) and source[0]["image"][:2] == b"\xff\xd8"
    steps_per_epoch = TINY_EXAMPLES // 4
    seen = []
    for process_index in (0, 1):
        iterator = data.train_iterator(cfg, global_batch=4, seed=11,
                                       process_index=process_index, process_count=2)
        batches = take(iterator, steps_per_epoch)
        assert batches[0]["images"].shape == (2, 24, 24, 3)
        seen.append([int(label) for b in batches for label in b["targets"].argmax(1)])
        # A fresh iterator resumed at step 2 continues with the same examples and pixels.
        resumed = data.train_iterator(cfg, global_batch=4, seed=11,
                                      process_index=process_index, process_count=2)
        resumed.set_state({"step": 2, "seed": 11, "global_batch": 4})
        assert_batches_equal(batches[2:], take(resumed, steps_per_epoch - 2))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(TINY_EXAMPLES))


def make_image_folder(root):
    layout = {"train": {"dog": 3, "cat": 2}, "validation": {"cat": 1, "bird": 2}}
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                (root / split / name / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return layout


def test_image_folder_source(tmp_path):
    make_image_folder(tmp_path)
    # Classes are the sorted union over splits: bird 0, cat 1, dog 2.
    assert sources.num_classes("image_folder", str(tmp_path)) == 3
    train = sources.open_source("image_folder", "train", str(tmp_path))
    assert [train[i]["label"] for i in range(len(train))] == [1, 1, 2, 2, 2]
    validation = sources.open_source("image_folder", "validation", str(tmp_path))
    assert [validation[i]["label"] for i in range(len(validation))] == [0, 0, 1]
    cfg = make_cfg(str(tmp_path), name="image_folder", train_split="train",
                   eval_split="validation", num_classes=3, workers=1)
    batch = next(data.train_iterator(cfg, global_batch=4, seed=0))
    assert batch["images"].shape == (4, 32, 32, 3)
    evals = list(data.eval_batches(cfg, global_batch=2))
    assert [int(b["mask"].sum()) for b in evals] == [2, 1]
    assert np.concatenate([b["labels"] for b in evals])[:3].tolist() == [0, 0, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        sources.open_source("image_folder", "train", str(tmp_path / "missing"))
    make_image_folder(tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="no split 'test'"):
        sources.open_source("image_folder", "test", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetNotFoundError, match="no images"):
        sources.open_source("image_folder", "empty", str(tmp_path))
    (tmp_path / "empty" / "cat").mkdir()    # more in tests/test_data_faults.py
    with pytest.raises(data.ImageFolderError, match="class directory with no images"):
        sources.open_source("image_folder", "empty", str(tmp_path))


def test_eval_preprocessor_matches_eval_batches(digits_dir):
    cfg = make_cfg(digits_dir)
    source = sources.open_source("sklearn_digits", "test", digits_dir)
    preprocess = data.eval_preprocessor(cfg)
    batch = next(iter(data.eval_batches(cfg, global_batch=8)))
    expected = np.stack([preprocess(source[i]["image"]) for i in range(8)])
    np.testing.assert_array_equal(batch["images"], expected)
    # Decoded arrays go through the same steps as encoded bytes.
    np.testing.assert_array_equal(preprocess(decode.decode(source[0]["image"])), expected[0])


def test_sources_hand_over_the_features_a_task_asks_for(digits_dir):
    images_only = sources.open_source("sklearn_digits", "test", digits_dir, features=("image",),
                                      task="self-supervised")
    assert len(images_only) == 360 and "image" in images_only[0]
    with pytest.raises(ValueError, match="no 'objects' feature, which the detection task needs"):
        sources.open_source("sklearn_digits", "test", digits_dir, features=("image", "objects"),
                            task="detection")
