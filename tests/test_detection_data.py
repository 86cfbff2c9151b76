"""The detection input pipeline (data/detection.py, data/builtin_detection.py): the official
EfficientDet train augmentation, eval scaling, sources (TFDS, coco_json, the built-in canvases)
and ground truth."""

import json
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from data import builtin, builtin_detection, decode, detection, sampler, sources

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


@pytest.fixture(scope="module")
def digits_dir(detection_data_dir):
    return detection_data_dir


def make_cfg(data_dir, **overrides):
    cfg = ml_collections.ConfigDict(dict(
        name=builtin_detection.NAME, data_dir=str(data_dir), train_split="train",
        eval_split="test", num_classes=10, train_size=64, test_size=64, mean=MEAN, std=STD,
        flip=True, workers=0, skip_unreadable=False, max_image_pixels=89_478_485,
        scale_min=0.1, scale_max=2.0, max_boxes=8, eval_annotations=""))
    cfg.update(overrides)
    return cfg


def recipe(**overrides):
    values = dict(train_size=64, test_size=64, mean=MEAN, std=STD, flip=True, scale_min=0.1,
                  scale_max=2.0, max_boxes=8)
    values.update(overrides)
    return detection.Recipe(**values)


def assert_batches_equal(expected, actual):
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_array_equal(expected[key], actual[key], err_msg=key)


# Resizing.


@pytest.mark.parametrize("in_size,out_size", [
    ((17, 23), (40, 9)), ((128, 128), (12, 250)), ((5, 7), (5, 7)), ((480, 640), (96, 128)),
    ((1, 3), (4, 4)), ((33, 50), (200, 301))])
def test_resize_bilinear_equals_tf_image_resize(in_size, out_size):
    tf = pytest.importorskip("tensorflow")
    image = np.random.default_rng(0).normal(size=in_size + (3,)).astype(np.float32) * 50
    expected = tf.image.resize(image, out_size, method="bilinear").numpy()
    ours = detection.resize_bilinear(image, *out_size)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    # A window of the output is that part of the whole output, computed alone.
    top, left = out_size[0] // 3, out_size[1] // 4
    window = detection.resize_bilinear(image, *out_size, (top, left, out_size[0] - top, 3))
    np.testing.assert_array_equal(window, ours[top:, left:left + 3])


# Training examples.


def test_train_example_box_arithmetic_by_hand():
    recipe_ = recipe(scale_min=1.0, scale_max=2.0, max_boxes=5)
    pixels = np.random.default_rng(1).integers(0, 256, (100, 200, 3)).astype(np.uint8)
    example = {
        "boxes": np.array([[0.1, 0.05, 0.5, 0.25],     # inside the crop once flipped
                           [0.2, 0.5, 1.0, 0.7],       # partly cropped on the left
                           [0.3, 0.8, 0.4, 0.9],       # cropped away: zero area, dropped
                           [0.0, 0.0, 1.0, 1.0]],      # crowd: dropped in training
                          np.float32),
        "labels": np.array([3, 7, 2, 5], np.int32),
        "is_crowd": np.array([False, False, False, True]),
        "points": np.array([[0.3, 0.15], [0.6, 0.6], [0.35, 0.85], [0.5, 0.5]], np.float32),
    }
    # The draws, in the official order: flip, r, offset y, offset x.
    draws = np.random.default_rng(1)
    assert draws.uniform() > 0.5                                      # flip
    assert int(np.float32(draws.uniform(1.0, 2.0)) * np.float32(64)) == 124   # scaled
    draws.uniform()                                                   # offset y: 62 < 64, none
    assert int(60 * np.float32(draws.uniform())) == 56                # offset x of 124 - 64
    # scale = min(124 / 100, 124 / 200) = 0.62: the image is 62 x 124, its x 56..119 kept.
    out = detection.train_example(pixels, example, np.random.default_rng(1), recipe_)

    np.testing.assert_array_equal(out["labels"], [3, 7])
    np.testing.assert_allclose(out["boxes"], [
        [0.1 * 62, 0.75 * 124 - 56, 0.5 * 62, 0.95 * 124 - 56],      # x' = 1 - x, flipped
        [0.2 * 62, 0.0, 1.0 * 62, 0.5 * 124 - 56],                    # x from -18.8 clipped to 0
    ], atol=1e-4)
    np.testing.assert_allclose(out["points"], [[0.3 * 62, 0.85 * 124 - 56],
                                               [0.6 * 62, 0.4 * 124 - 56]], atol=1e-4)
    normalised = (pixels[:, ::-1].astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    expected = np.zeros((64, 64, 3), np.float32)
    expected[:62] = detection.resize_bilinear(normalised, 62, 124)[:, 56:120]
    np.testing.assert_array_equal(out["image"], expected)


def test_train_example_without_flip_draws_no_flip():
    pixels = np.zeros((10, 10, 3), np.uint8)
    example = {"boxes": np.array([[0.0, 0.0, 0.5, 0.5]], np.float32),
               "labels": np.array([1]), "is_crowd": np.array([False])}
    out = detection.train_example(pixels, example, np.random.default_rng(0),
                                  recipe(flip=False, scale_min=1.0, scale_max=1.0))
    np.testing.assert_allclose(out["boxes"], [[0, 0, 32, 32]])   # 10 px -> 64 px, no flip


def test_train_boxes_stay_on_the_canvas_and_padding_is_masked():
    rng = np.random.default_rng(0)
    recipe_ = recipe(max_boxes=6)
    for trial in range(150):
        height, width = (int(v) for v in rng.integers(8, 160, 2))
        count = int(rng.integers(0, 10))
        corners = np.sort(rng.uniform(0, 1, (count, 2, 2)), axis=1)
        boxes = np.concatenate([corners[:, 0], corners[:, 1]], axis=1).astype(np.float32)
        example = {"boxes": boxes, "labels": rng.integers(1, 11, count),
                   "is_crowd": rng.uniform(size=count) < 0.2,
                   "points": rng.uniform(0, 1, (count, 2)).astype(np.float32)}
        pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        jitter = detection.draw_jitter(np.random.default_rng(trial), height, width, recipe_)
        out = detection.train_example(pixels, example, np.random.default_rng(trial), recipe_)
        kept = out["boxes"]
        assert len(kept) == len(out["labels"]) == len(out["points"]) <= 6
        assert np.all((kept >= 0) & (kept <= 63))
        assert np.all((kept[:, 2] > kept[:, 0]) & (kept[:, 3] > kept[:, 1]))
        assert np.all(out["labels"] >= 1)
        # Beyond the scaled image the canvas is zero padding.
        assert not out["image"][jitter.scaled_height:].any()
        assert not out["image"][:, jitter.scaled_width:].any()
        padded = detection._padded(out["labels"], 6, -1, np.int32)
        assert np.all(padded[len(kept):] == -1) and np.all(padded[:len(kept)] >= 1)


def test_train_batches_have_fixed_shapes_and_padded_ground_truth(digits_dir):
    iterator = detection.train_iterator(make_cfg(digits_dir), global_batch=4, seed=0)
    try:
        for _ in range(3):
            batch = next(iterator)
            assert batch["images"].shape == (4, 64, 64, 3)
            assert batch["images"].dtype == np.float32
            assert batch["boxes"].shape == (4, 8, 4) and batch["boxes"].dtype == np.float32
            assert batch["labels"].shape == (4, 8) and batch["labels"].dtype == np.int32
            assert batch["points"].shape == (4, 8, 2)
            valid = batch["labels"] >= 1
            assert np.all(batch["labels"][~valid] == -1)
            assert not batch["boxes"][~valid].any() and not batch["points"][~valid].any()
            # Valid rows come first.
            assert np.all(np.diff(valid.astype(int), axis=1) <= 0)
            assert np.all((batch["boxes"] >= 0) & (batch["boxes"] <= 63))
            assert np.all(batch["labels"] <= 10)
        assert iterator.unreadable == 0
    finally:
        iterator.close()


def test_train_batches_are_deterministic_and_do_not_depend_on_process_count(digits_dir):
    cfg = make_cfg(digits_dir)

    def batches(count, **kwargs):
        iterator = detection.train_iterator(cfg, global_batch=4, seed=3, **kwargs)
        try:
            return [next(iterator) for _ in range(count)], iterator.get_state()
        finally:
            iterator.close()

    first, _ = batches(2)
    again, _ = batches(2)
    for want, got in zip(first, again):
        assert_batches_equal(want, got)
    halves = [batches(2, process_index=p, process_count=2)[0] for p in range(2)]
    for step in range(2):
        joined = {key: np.concatenate([halves[0][step][key], halves[1][step][key]])
                  for key in first[step]}
        assert_batches_equal(first[step], joined)
    # A resumed iterator continues on the same examples.
    _, state = batches(1)
    resumed = detection.train_iterator(cfg, global_batch=4, seed=3)
    try:
        resumed.set_state(state)
        assert_batches_equal(first[1], next(resumed))
    finally:
        resumed.close()


# coco_json.


def write_coco(root, content=None, split="val", images=True):
    """A tiny COCO-format dataset: images 10 (40x80), 20 (90x30), 30 (50x50, no objects)."""
    if content is None:
        content = valid_coco()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if images:
        (root / split).mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for image in valid_coco()["images"]:
            pixels = rng.integers(0, 256, (image["height"], image["width"], 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / split / image["file_name"])
    return root


def valid_coco():
    return {
        "images": [{"id": 20, "height": 90, "width": 30, "file_name": "b.png"},
                   {"id": 10, "height": 40, "width": 80, "file_name": "a.png"},
                   {"id": 30, "height": 50, "width": 50, "file_name": "c.png"}],
        "annotations": [
            {"id": 1, "image_id": 10, "bbox": [8, 4, 40, 20], "category_id": 1},
            {"id": 2, "image_id": 10, "bbox": [0, 0, 80, 40], "category_id": 3, "iscrowd": 1},
            {"id": 3, "image_id": 20, "bbox": [5, 10, 20.5, 60], "category_id": 3},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
    }


def coco_cfg(root, **overrides):
    return make_cfg(root, **dict(dict(name="coco_json", train_split="val", eval_split="val"),
                                 **overrides))


def _drop(key):
    def change(content):
        del content[key]
    return change


def _set(collection, index, key, value):
    def change(content):
        if value is None:
            del content[collection][index][key]
        else:
            content[collection][index][key] = value
    return change


@pytest.mark.parametrize("change,message", [
    (_drop("categories"), "missing top-level key(s) 'categories'"),
    (_set("annotations", 0, "bbox", None), "annotation 1 is missing 'bbox'"),
    (_set("annotations", 2, "category_id", None), "annotation 3 is missing 'category_id'"),
    (_set("images", 1, "height", None), "image 10 is missing 'height'"),
    (_set("images", 1, "width", 0), "image 10 has height 40 and width 0"),
    (_set("annotations", 0, "bbox", [60, 4, 30, 20]),
     "annotation 1 (image 10): bbox [60, 4, 30, 20] ([x, y, w, h] px) is outside the image"),
    (_set("annotations", 0, "bbox", [8, 4, -3, 20]), "negative width or height"),
    (_set("annotations", 0, "category_id", 2), "category id 2 is not in 'categories'"),
    (_set("annotations", 0, "image_id", 99), "image_id 99 is not in 'images'"),
    (_set("categories", 1, "id", 12), "set --config.data.num_classes=12"),
    ("{not json", "not valid JSON"),
    (None, "annotations/instances_<split>.json and the images in"),
], ids=["top_key", "annotation_bbox", "annotation_category", "image_height", "image_width",
        "box_outside", "negative_size", "unknown_category", "unknown_image",
        "category_beyond_num_classes",
        "not_json", "missing_file"])
def test_malformed_coco_json_is_a_one_line_error_naming_the_problem(tmp_path, change, message):
    if change is None:
        root = tmp_path
    elif isinstance(change, str):
        root = write_coco(tmp_path, change, images=False)
    else:
        content = valid_coco()
        change(content)
        root = write_coco(tmp_path, content, images=False)
    with pytest.raises(detection.DetectionDataError) as error:
        detection.num_train_examples(coco_cfg(root))
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    if change is not None:
        assert "instances_val.json" in str(error.value)


def test_coco_json_box_within_one_pixel_tolerance_is_clipped(tmp_path):
    content = valid_coco()
    content["annotations"][0]["bbox"] = [-0.5, 4, 81, 20]
    source = detection.open_source(coco_cfg(write_coco(tmp_path, content)), "val")
    np.testing.assert_allclose(source[0]["boxes"][0], [0.1, 0.0, 0.6, 1.0], atol=1e-6)


def test_coco_json_eval_batches_scale_pad_and_ground_truth_in_original_pixels(tmp_path):
    root = write_coco(tmp_path)
    cfg = coco_cfg(root)
    batches = detection.eval_batches(cfg, global_batch=4)
    assert len(batches) == 1
    batch = next(iter(batches))
    np.testing.assert_array_equal(batch["mask"], [True, True, True, False])
    np.testing.assert_array_equal(batch["image_ids"][:3], [10, 20, 30])   # sorted by id
    np.testing.assert_array_equal(batch["image_sizes"][:3], [[40, 80], [90, 30], [50, 50]])
    # 40x80 into 64: scale min(64/40, 64/80) = 0.8, scaled 32x64; 50x50: 1.28, 64x64.
    np.testing.assert_allclose(batch["scales"][[0, 2]], [1 / 0.8, 1 / 1.28], rtol=1e-6)
    np.testing.assert_allclose(batch["scales"][1], 90 / 64, rtol=1e-6)
    pixels = np.asarray(Image.open(root / "val" / "a.png"))
    normalised = (pixels.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(batch["images"][0, :32],
                                  detection.resize_bilinear(normalised, 32, 64))
    assert not batch["images"][0, 32:].any() and not batch["images"][3].any()
    # Ground truth in original pixels: bbox [x, y, w, h] -> (ymin, xmin, ymax, xmax).
    np.testing.assert_allclose(batch["boxes"][0, :2], [[4, 8, 24, 48], [0, 0, 40, 80]],
                               atol=1e-4)
    np.testing.assert_array_equal(batch["labels"][0, :3], [1, 3, -1])
    np.testing.assert_array_equal(batch["is_crowd"][0, :3], [False, True, False])
    np.testing.assert_allclose(batch["boxes"][1, 0], [10, 5, 70, 25.5], atol=1e-4)
    np.testing.assert_array_equal(batch["labels"][2], -1)   # image 30 has no objects
    assert "points" not in batch

    truth = detection.ground_truth(cfg)
    assert truth["images"] == [{"id": 10, "height": 40, "width": 80},
                               {"id": 20, "height": 90, "width": 30},
                               {"id": 30, "height": 50, "width": 50}]
    assert truth["categories"] == [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    first = truth["annotations"][0]
    assert (first["image_id"], first["category_id"], first["iscrowd"]) == (10, 1, 0)
    np.testing.assert_allclose(first["bbox"], [8, 4, 40, 20], atol=1e-4)
    np.testing.assert_allclose(first["area"], 800, atol=1e-3)
    assert [a["iscrowd"] for a in truth["annotations"]] == [0, 1, 0]
    assert detection.class_names(cfg) == ["cat", "", "dog"] + [""] * 7


def test_coco_json_image_without_objects_trains_as_all_background(tmp_path):
    source = detection.open_source(coco_cfg(write_coco(tmp_path)), "val")
    example = source[2]
    assert example["image_id"] == 30 and len(example["labels"]) == 0
    maker = detection.TrainBatchMaker(source, recipe(), sampler.Sharding(3, 0, 1), seed=0)
    batch = maker(0)
    rows = {int(i): row for row, i in enumerate(
        sampler.stream_examples(0, 0, sampler.Sharding(3, 0, 1), 3)[1])}
    np.testing.assert_array_equal(batch["labels"][rows[2]], -1)
    # The crowd box (label 3) of image 10 is dropped in training.
    assert set(batch["labels"][rows[0]].tolist()) <= {1, -1}


def test_coco_json_missing_image_file_is_an_unreadable_example(tmp_path):
    root = write_coco(tmp_path)
    (root / "val" / "b.png").unlink()
    with pytest.raises(decode.UnreadableImageError, match="b.png"):
        next(iter(detection.eval_batches(coco_cfg(root), global_batch=4)))
    batch = next(iter(detection.eval_batches(coco_cfg(root, skip_unreadable=True),
                                             global_batch=4)))
    np.testing.assert_array_equal(batch["mask"], [True, False, True, False])
    maker = detection.TrainBatchMaker(detection.open_source(coco_cfg(root), "val"),
                                      recipe(skip_unreadable=True), sampler.Sharding(3, 0, 1),
                                      seed=0)
    batch = maker(0)
    assert int(batch[sampler.UNREADABLE]) == 1
    # Makers travel to grain's worker processes pickled.
    assert_batches_equal(batch, pickle.loads(pickle.dumps(maker))(0))


# TFDS sources and the built-in dataset.


def test_coco_category_ids_are_the_90_id_scheme():
    ids = detection.COCO_CATEGORY_IDS
    assert len(ids) == 80 and list(ids) == sorted(set(ids)) and ids[-1] == 90
    assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path):
    cfg = make_cfg(tmp_path, name="coco/2017")
    with pytest.raises(sources.DatasetNotFoundError,
                       match="tfds build coco/2017 --file_format=array_record"):
        detection.num_train_examples(cfg)


def test_more_classes_than_the_head_is_an_error(digits_dir):
    with pytest.raises(detection.DetectionDataError, match="has 10 classes"):
        detection.num_train_examples(make_cfg(digits_dir, num_classes=5))


def test_builtin_detection_dataset_is_prepared_with_its_sizes(digits_dir):
    cfg = make_cfg(digits_dir)
    assert detection.num_train_examples(cfg) == builtin_detection.NUM_CANVASES["train"]
    assert len(detection.open_source(cfg, "test")) == builtin_detection.NUM_CANVASES["test"]
    assert detection.class_names(cfg) == [str(d) for d in range(10)]


def test_builtin_canvases_have_tight_disjoint_boxes_and_centred_points(digits_dir):
    source = detection.open_source(make_cfg(digits_dir), "test")
    assert source.has_points
    _, gray_digits, _ = builtin_detection.split_digits("test")
    for index in range(40):
        example = source[index]
        pixels = decode.decode(example["image"])
        assert pixels.shape == (128, 128, 3)
        # The stored canvas is the generator's for its id.
        canvas = builtin_detection.make_canvas("test", example["image_id"], gray_digits)
        np.testing.assert_array_equal(pixels, canvas["image"])
        boxes = np.rint(example["boxes"] * 128).astype(int)
        np.testing.assert_allclose(example["boxes"] * 128, boxes, atol=1e-4)
        np.testing.assert_array_equal(boxes, canvas["boxes"])
        assert 1 <= len(boxes) <= builtin_detection.MAX_DIGITS
        assert np.all((example["labels"] >= 1) & (example["labels"] <= 10))
        assert not example["is_crowd"].any()
        # Tight: every bright pixel lies in a box, and each box's edges touch the digit.
        bright = pixels.max(axis=2) >= builtin_detection.DIGIT_THRESHOLD
        covered = np.zeros_like(bright)
        for ymin, xmin, ymax, xmax in boxes:
            covered[ymin:ymax, xmin:xmax] = True
            digit = pixels[ymin:ymax, xmin:xmax].min(axis=2) > builtin_detection.NOISE_MAX
            assert digit[0].any() and digit[-1].any() and digit[:, 0].any() and digit[:, -1].any()
        assert not (bright & ~covered).any()
        # Disjoint boxes.
        for i in range(len(boxes)):
            for j in range(i):
                a, b = boxes[i], boxes[j]
                assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
        # Points are the boxes' centres.
        centres = (example["boxes"][:, :2] + example["boxes"][:, 2:]) / 2
        np.testing.assert_allclose(example["points"], centres, atol=1e-6)


def test_builtin_test_canvases_use_test_digits_only():
    from sklearn.datasets import load_digits

    total = len(load_digits().target)
    indices, gray, labels = builtin_detection.split_digits("test")
    np.testing.assert_array_equal(indices, builtin.split_indices(total, "test"))
    assert not set(indices) & set(builtin.split_indices(total, "train"))
    assert len(gray) == len(labels) == len(indices)
    for index in range(20):
        canvas = builtin_detection.make_canvas("test", index, gray)
        assert np.all((canvas["digits"] >= 0) & (canvas["digits"] < len(indices)))


def test_builtin_ground_truth_counts_and_categories(digits_dir):
    cfg = make_cfg(digits_dir)
    truth = detection.ground_truth(cfg)
    source = detection.open_source(cfg, "test")
    objects = sum(len(source[i]["labels"]) for i in range(len(source)))
    assert len(truth["images"]) == 300 and len(truth["annotations"]) == objects
    assert truth["categories"] == [{"id": k + 1, "name": str(k)} for k in range(10)]
    assert {img["height"] for img in truth["images"]} == {128}
    assert len({a["id"] for a in truth["annotations"]}) == objects
    assert {a["category_id"] for a in truth["annotations"]} == set(range(1, 11))
    # The eval batch's ground truth is the same boxes, (ymin, xmin, ymax, xmax).
    batch = next(iter(detection.eval_batches(cfg, global_batch=2)))
    first = [a for a in truth["annotations"] if a["image_id"] == batch["image_ids"][0]]
    x, y, w, h = first[0]["bbox"]
    np.testing.assert_allclose(batch["boxes"][0, 0], [y, x, y + h, x + w], atol=1e-4)
    assert batch["labels"][0, 0] == first[0]["category_id"]
    np.testing.assert_allclose(batch["points"][0, 0], [y + h / 2, x + w / 2], atol=1e-4)
    np.testing.assert_allclose(batch["scales"], 2.0)   # 128 px into 64


def test_ground_truth_from_eval_annotations_file(digits_dir, tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(valid_coco()))
    assert detection.ground_truth(make_cfg(digits_dir, eval_annotations=str(path))) == \
        valid_coco()
    with pytest.raises(detection.DetectionDataError, match="eval_annotations"):
        detection.ground_truth(make_cfg(digits_dir, eval_annotations=str(tmp_path / "none")))
