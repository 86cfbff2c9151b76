"""Bad input data (issue 18, items 6 and 7): unreadable images name their example, can be skipped
deterministically and are counted; the pixel limit; image-folder layout rules (hidden entries,
empty classes, the class count); 16-bit, transparent, grayscale and CMYK images."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

import data
from data import classification, decode, sampler, sources
from tests.test_data import assert_batches_equal, make_cfg, take

SIZE = 20   # good images are SIZE x SIZE


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def good_jpeg(value: int, size: int = SIZE) -> bytes:
    pixels = np.random.default_rng(value).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG")


BAD = {
    "truncated": lambda: good_jpeg(99, 30)[:len(good_jpeg(99, 30)) // 2],   # header intact
    "text": lambda: b"this is not an image, just text in a file named .jpg\n",
    "too_large": lambda: good_jpeg(98, 40),     # 1,600 pixels, over the tests' limit of 1,000
}
LIMIT = 1000


def one_class_per_image(root, split="train", count=8, bad=None):
    """root/split/c<i>/<i>.jpg, one image per class, so a label names its example; `bad` maps a
    class number to a BAD kind."""
    bad = bad or {}
    for i in range(count):
        directory = root / split / f"c{i}"
        directory.mkdir(parents=True)
        content = BAD[bad[i]]() if i in bad else good_jpeg(i)
        (directory / f"{i}.jpg").write_bytes(content)
    return root


def folder_cfg(root, count=8, **overrides):
    settings = dict(name="image_folder", num_classes=count, eval_split="train", train_size=16,
                    test_size=16, image_ops="torchvision", interpolation="bilinear",
                    max_image_pixels=LIMIT)
    settings.update(overrides)
    return make_cfg(str(root), **settings)


# Item 6: unreadable images.


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "cannot decode it"),
    ("text", "not an image file PIL can identify"),
    ("too_large", "40x40 = 1,600 pixels, over the limit of 1,000 pixels"),
])
def test_unreadable_image_error_names_the_example(tmp_path, kind, reason):
    one_class_per_image(tmp_path, count=4, bad={2: kind})
    path = str(tmp_path / "train" / "c2" / "2.jpg")
    for crop in (True, False):      # header first (the crop), or the whole image at once
        iterator = data.train_iterator(folder_cfg(tmp_path, 4, random_resized_crop=crop),
                                       global_batch=4, seed=0)
        with pytest.raises(data.UnreadableImageError) as error:
            next(iterator)      # the one step reads all four
        message = str(error.value)
        assert isinstance(error.value, ValueError) and "\n" not in message
        for part in ("image_folder:train example 2", path, reason, "data.skip_unreadable"):
            assert part in message
    with pytest.raises(data.UnreadableImageError, match=re.escape(f"example 2 ({path})")):
        list(data.eval_batches(folder_cfg(tmp_path, 4), global_batch=4))


def test_skip_unreadable_replaces_by_the_next_readable_example_and_counts(tmp_path):
    count, batch = 8, 4
    bad = {2: "truncated", 5: "text", 6: "too_large"}
    one_class_per_image(tmp_path, count=count, bad=bad)
    cfg = folder_cfg(tmp_path, count, skip_unreadable=True, random_resized_crop=False,
                     flip=False)
    iterator = data.train_iterator(cfg, global_batch=batch, seed=4)
    steps = 6   # three epochs of two steps
    batches = take(iterator, steps)
    # The rule: position p's example, or else the next readable one in its epoch's permutation.
    expected_labels, expected_count = [], 0
    for step in range(steps):
        positions, indices = sampler.stream_examples(4, step, sampler.Sharding(batch, 0, 1),
                                                     count)
        for position, index in zip(positions, indices):
            candidates = [int(index), *sampler.successors(4, position, count, batch)]
            readable = [c for c in candidates if c not in bad]
            expected_count += candidates.index(readable[0])
            expected_labels.append(readable[0])     # one class per image: label == index
    labels = [int(label) for b in batches for label in b["targets"].argmax(1)]
    assert labels == expected_labels and not set(labels) & set(bad)
    assert all(b["images"].shape == (batch, 16, 16, 3) for b in batches)
    assert "unreadable" not in batches[0]
    assert iterator.unreadable == expected_count > 0
    assert iterator.get_state()["unreadable"] == expected_count
    # The replacement keeps the position's random choices and is the replacement's pixels.
    source = sources.open_source("image_folder", "train", str(tmp_path))
    recipe = classification.Recipe.from_config(cfg)
    np.testing.assert_array_equal(
        batches[0]["images"],
        np.stack([classification.eval_image(source[i]["image"], recipe)
                  for i in expected_labels[:batch]]))

    # Exactly resumable, count included; and the same rows on two processes.
    for resume_at in (1, 3):
        fresh = data.train_iterator(cfg, global_batch=batch, seed=4)
        take(fresh, resume_at)
        state = json.loads(json.dumps(fresh.get_state()))
        resumed = data.train_iterator(cfg, global_batch=batch, seed=4)
        resumed.set_state(state)
        assert resumed.unreadable == state["unreadable"]
        assert_batches_equal(batches[resume_at:], take(resumed, steps - resume_at))
        assert resumed.unreadable == expected_count
    halves = [data.train_iterator(cfg, global_batch=batch, seed=4, process_index=p,
                                  process_count=2) for p in (0, 1)]
    split = [take(half, steps) for half in halves]
    for step in range(steps):
        joined = np.concatenate([split[0][step]["targets"], split[1][step]["targets"]])
        np.testing.assert_array_equal(joined, batches[step]["targets"])
    assert halves[0].unreadable + halves[1].unreadable == expected_count


def test_skip_unreadable_in_eval_masks_the_example(tmp_path):
    one_class_per_image(tmp_path, count=4, bad={1: "truncated"})
    batches = list(data.eval_batches(folder_cfg(tmp_path, 4, skip_unreadable=True),
                                     global_batch=3))
    assert np.concatenate([b["mask"] for b in batches]).tolist() == [
        True, False, True, True, False, False]
    labels = np.concatenate([b["labels"] for b in batches])
    assert labels[[0, 2, 3]].tolist() == [0, 2, 3]


def test_skip_gives_up_when_nothing_is_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(classification, "MAX_CONSECUTIVE_UNREADABLE", 3)
    one_class_per_image(tmp_path, count=4, bad={i: "text" for i in range(4)})
    iterator = data.train_iterator(folder_cfg(tmp_path, 4, skip_unreadable=True),
                                   global_batch=2, seed=0)
    with pytest.raises(data.UnreadableImageError, match="3 unreadable examples in a row"):
        next(iterator)


def test_pixel_limit(monkeypatch):
    # Limits above PIL's (0 = none) raise PIL's global one; restored after the test.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    image = good_jpeg(0, 40)    # 1,600 pixels
    assert decode.decode(image, max_pixels=1600).shape == (40, 40, 3)
    assert decode.decode(image, max_pixels=0).shape == (40, 40, 3)   # 0: no limit
    with pytest.raises(data.UnreadableImageError, match="40x40 = 1,600 pixels, over the limit "
                                                        "of 1,599 pixels"):
        decode.image_size(image, max_pixels=1599)
    # PIL's own guard refuses images above twice its limit before their size can be read: a
    # smaller configured limit still says the size, a larger one lifts PIL's.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)
    with pytest.raises(data.UnreadableImageError, match="1,600 pixels, over the limit of 500"):
        decode.decode(image, max_pixels=500)
    assert decode.decode(image, max_pixels=2000).shape == (40, 40, 3)
    assert data.DEFAULT_MAX_IMAGE_PIXELS == 89_478_485 == data.decode.DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels must be >= 0"):
        classification.Recipe.from_config(make_cfg("", max_image_pixels=-1))


# Item 7: image folders and image modes.


def test_image_folder_ignores_hidden_entries(tmp_path):
    for name, count in (("cat", 2), ("dog", 1)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "train" / name / f"{i}.jpg").write_bytes(good_jpeg(i))
    junk = {
        "train/.ipynb_checkpoints/x.jpg": good_jpeg(7),   # a hidden "class" sorting first
        ".ipynb_checkpoints/aardvark/x.jpg": good_jpeg(8),  # a hidden "split"
        "train/.DS_Store": b"\0\0\0\1Bud1",
        "train/cat/.DS_Store": b"\0\0\0\1Bud1",
        "train/cat/._0.jpg": b"\0\5\26\7 macOS resource fork",
    }
    for relative, content in junk.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(content)
    assert sources.num_classes("image_folder", str(tmp_path)) == 2
    train = sources.open_source("image_folder", "train", str(tmp_path))
    assert [train[i]["label"] for i in range(len(train))] == [0, 0, 1]
    assert all("/." not in train.describe(i) for i in range(len(train)))
    batch = next(iter(data.eval_batches(folder_cfg(tmp_path, 2), global_batch=3)))
    assert batch["labels"].tolist() == [0, 0, 1]


def test_image_folder_rejects_empty_class_directories(tmp_path):
    one_class_per_image(tmp_path, count=3)
    (tmp_path / "train" / "zebra").mkdir()
    (tmp_path / "train" / "yak").mkdir()
    (tmp_path / "train" / "yak" / ".DS_Store").write_bytes(b"hidden")
    (tmp_path / "train" / "yak" / "notes.txt").write_text("not an image")
    for call in (lambda: sources.num_classes("image_folder", str(tmp_path)),
                 lambda: data.train_iterator(folder_cfg(tmp_path, 5), global_batch=2, seed=0)):
        with pytest.raises(data.ImageFolderError, match="2 class directories with no images") as e:
            call()
        assert str(tmp_path / "train" / "zebra") in str(e.value)
        assert str(tmp_path / "train" / "yak") in str(e.value)


@pytest.mark.parametrize("configured", [2, 4])
def test_image_folder_class_count_must_match_the_config(tmp_path, configured):
    one_class_per_image(tmp_path, count=3)
    with pytest.raises(ValueError, match=f"has 3 classes .* data.num_classes is {configured}"):
        data.train_iterator(folder_cfg(tmp_path, configured), global_batch=2, seed=0)
    with pytest.raises(ValueError, match=f"has 3 classes .* data.num_classes is {configured}"):
        data.eval_batches(folder_cfg(tmp_path, configured), global_batch=2)
    data.check_num_classes(folder_cfg(tmp_path, 3))


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 40000, 65535]], np.uint16)
    encoded = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(encoded)).mode.startswith("I;16")
    pixels = decode.decode(encoded)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 4, 3)
    np.testing.assert_array_equal(pixels[..., 0], [[0, 1, 156, 255]])   # 40000 * 255 / 65535
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    np.testing.assert_array_equal(decode.decode(encoded, (0, 2, 1, 2)), pixels[:, 2:])


def test_transparency_is_composited_onto_white():
    rgba = np.array([[[200, 100, 0, 255], [200, 100, 0, 0], [200, 100, 0, 128]]], np.uint8)
    expected = np.rint(rgba[..., :3] * (rgba[..., 3:] / 255)
                       + 255 * (1 - rgba[..., 3:] / 255)).astype(np.uint8)
    np.testing.assert_array_equal(decode.decode(encode(Image.fromarray(rgba, "RGBA"))), expected)
    np.testing.assert_array_equal(
        decode.decode(encode(Image.fromarray(rgba, "RGBA")), (0, 1, 1, 2)), expected[:, 1:])
    gray_alpha = Image.fromarray(rgba[..., [0, 3]], "LA")
    np.testing.assert_array_equal(decode.decode(encode(gray_alpha))[..., 1], expected[..., 0])
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    np.testing.assert_array_equal(decode.decode(encode(palette, transparency=0)),
                                  [[[255, 255, 255], [40, 50, 60]]])
    assert decode.ALPHA_BACKGROUND == (255, 255, 255)


def test_grayscale_and_cmyk_become_rgb():
    gray = decode.decode(encode(Image.fromarray(np.array([[0, 90]], np.uint8), "L")))
    np.testing.assert_array_equal(gray, [[[0, 0, 0], [90, 90, 90]]])
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0]]], np.uint8), "CMYK")
    np.testing.assert_array_equal(decode.decode(encode(cmyk, "JPEG", quality=100)).shape,
                                  (1, 2, 3))
    np.testing.assert_array_equal(decode.decode(encode(cmyk, "TIFF")),
                                  [[[255, 255, 255], [0, 255, 255]]])


def test_unreadable_image_error_crosses_worker_processes(tmp_path):
    # The ImageNet configs decode in grain worker processes; the error keeps its type there.
    one_class_per_image(tmp_path, count=4, bad={1: "text"})
    iterator = data.train_iterator(folder_cfg(tmp_path, 4, workers=1), global_batch=4, seed=0)
    with pytest.raises(data.UnreadableImageError, match=re.escape(str(tmp_path / "train" / "c1"))):
        next(iterator)
    iterator.close()
