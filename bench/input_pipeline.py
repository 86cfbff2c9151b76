"""Images per second per CPU core of the NFNet training input pipeline, on JPEG-encoded images.

    python -m bench.input_pipeline                 # NFNet-F0 recipe: 192 px, RandAugment 4 x 5
    python -m bench.input_pipeline --size 224 --magnitude 10 --images 200 --rounds 5

Each stage is timed in this process on one thread (BLAS and TF thread pools pinned to 1), in
rounds interleaved so that machine noise hits every variant alike; the median round is reported.
Test images are photos (scikit-learn's two sample images) cut and resized to ImageNet's typical
shapes and re-encoded as JPEG (quality 90).

- decode: PIL's full JPEG decode.
- decode+crop+resize: TF's crop sampler, decode of the crop, flip, TF bicubic resize
  (what tf.data's fused decode_and_crop_jpeg + resize does; the official pipeline's first stage).
- same, draft: PIL's DCT-domain downscale (`Image.draft`) when the crop is at least twice the
  output size (not bit-exact with the reference: libjpeg scales in the DCT domain first).
- NFNet row: one training row of the F0 recipe = two decoded crops, MixUp or CutMix, RandAugment
  (4 layers) on the mix, normalisation; and the host's part of it with data.augment_on_device
  (the two crops and the random draws; the rest runs in the train step).
- tf.data (when TensorFlow is installed): decode_and_crop_jpeg + flip + bicubic resize over a
  dataset of the same bytes, private thread pool of 1.
- grain: the real batch maker in one grain worker process per core (`data.workers`), NFNet rows,
  batch 8, reported per core; with and without data.augment_on_device.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data import augment, classification, decode, randaugment, resize, sampler  # noqa: E402

# ImageNet's common shapes (height, width), most frequent first.
SHAPES = ((375, 500), (333, 500), (500, 375), (500, 500), (400, 500), (281, 500))
# NFNet-F0 published train step: 73.3 ms (TPUv3 core) / 56.7 ms (V100), assumed at the paper's
# 32 images per device.
PUBLISHED_F0 = {"TPUv3 core (73.3 ms / 32 images)": 32 / 0.0733,
                "V100 (56.7 ms / 32 images)": 32 / 0.0567}
TF_REFERENCE_PER_CORE = {"tf.data decode+crop (issue)": 1111, "grain+PIL (issue)": 464}


def jpeg_images(count: int, seed: int = 0) -> list[bytes]:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    encoded = []
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = SHAPES[i % len(SHAPES)]
        scale = rng.uniform(0.6, 1.0)
        crop_height = int(photo.shape[0] * scale)
        crop_width = min(photo.shape[1], int(crop_height * width / height))
        top = int(rng.integers(0, photo.shape[0] - crop_height + 1))
        left = int(rng.integers(0, photo.shape[1] - crop_width + 1))
        region = Image.fromarray(photo[top:top + crop_height, left:left + crop_width])
        buffer = io.BytesIO()
        region.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG",
                                                                      quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def crop_resize(encoded: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
    height, width = decode.image_size(encoded)
    box = augment.train_crop_box(rng, height, width, "tf", 0.08, size)
    pixels = augment.random_flip(decode.decode(encoded, box), rng)
    return resize.tf_bicubic(pixels, size, size)


def crop_resize_draft(encoded: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as opened:
        width, height = opened.size
        top, left, box_height, box_width = augment.train_crop_box(rng, height, width, "tf", 0.08,
                                                                  size)
        factor = min(box_height, box_width) // size   # keep the crop >= size after scaling
        if factor >= 2:
            opened.draft("RGB", (width // factor, height // factor))
        scale = opened.size[0] / width
        box = (int(left * scale), int(top * scale), int((left + box_width) * scale),
               int((top + box_height) * scale))
        pixels = np.asarray(opened.convert("RGB").crop(box))
    return resize.tf_bicubic(augment.random_flip(pixels, rng), size, size)


def nfnet_rows(images: list[bytes], size: int, magnitude: float, on_device: bool = False) -> None:
    """NFNet rows as the host makes them; on_device: the host's part of data.augment_on_device
    (the crops and the draws; mixing, RandAugment and normalisation are left to the step)."""
    recipe_rng = np.random.default_rng(0)
    mean, std = (124.0, 116.0, 104.0), (58.0, 57.0, 57.0)
    targets = augment.one_hot(np.arange(len(images)) % 1000, 1000)
    for i in range(0, len(images) - 1, 2):
        first = crop_resize(images[i], recipe_rng, size)
        second = crop_resize(images[i + 1], recipe_rng, size)
        kind = augment.mix_kind(i // 2, True, True)
        if on_device:
            lam, _ = augment.draw_mix(kind, recipe_rng, 0.2, size, size)
            augment.mix_targets(targets[i], targets[i + 1], lam)
            randaugment.plan(recipe_rng, 4, magnitude, size, size)
            continue
        mixed, _ = augment.mix_pair(kind, first, second, targets[i], targets[i + 1], recipe_rng,
                                    0.2)
        pixels = np.clip(mixed, 0, 255).astype(np.uint8)
        pixels = randaugment.randaugment(pixels, recipe_rng, 4, magnitude)
        augment.normalize(pixels, mean, std)


def tf_data_runner(images: list[bytes], size: int):
    try:
        import tensorflow as tf
    except ImportError:
        return None
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    def preprocess(encoded):
        shape = tf.image.extract_jpeg_shape(encoded)
        begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
            shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
        image = tf.image.random_flip_left_right(image)
        return tf.image.resize(image, (size, size), "bicubic")

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    dataset = tf.data.Dataset.from_tensor_slices(images).map(preprocess).with_options(options)

    def run():
        for _ in dataset:
            pass
    run()   # trace the map function once
    return run


def grain_runner(images: list[bytes], size: int, magnitude: float, batch: int, cores: int,
                 on_device: bool = False):
    import grain
    import ml_collections

    source = [{"image": image, "label": i % 1000} for i, image in enumerate(images)]
    cfg = ml_collections.ConfigDict(dict(
        train_size=size, test_size=size, eval_preprocess="resize_crop_32", crop_fraction=0.875,
        image_ops="tf", interpolation="bicubic", mean=(124.0, 116.0, 104.0),
        std=(58.0, 57.0, 57.0), random_resized_crop=True, min_area=0.08, flip=True,
        mixup_alpha=0.2, cutmix=True, randaugment_layers=4, randaugment_magnitude=magnitude,
        augment_before_mix=False, num_classes=1000, augment_on_device=on_device))
    recipe = classification.Recipe.from_config(cfg)
    make_batch = classification.TrainBatchMaker(source, recipe, sampler.Sharding(batch, 0, 1),
                                                0)
    steps = len(images) // (2 * batch)

    def run():
        # Worker processes, one per core, as `data.workers` sets them; the first batch (worker
        # start-up) is not timed.
        batches = sampler.iterate(grain.MapDataset.range(steps + 1).map(make_batch), cores)
        next(batches)
        start = time.perf_counter()
        for _ in range(steps):
            next(batches)
        return time.perf_counter() - start
    return run, steps * batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--magnitude", type=float, default=5.0)   # F0's RandAugment magnitude
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    images = jpeg_images(args.images)
    size = args.size

    variants = {
        "decode": (lambda: [decode.decode(im) for im in images], len(images)),
        "decode+crop+resize": (lambda: [crop_resize(im, np.random.default_rng(i), size)
                                        for i, im in enumerate(images)], len(images)),
        "decode+crop+resize, draft": (
            lambda: [crop_resize_draft(im, np.random.default_rng(i), size)
                     for i, im in enumerate(images)], len(images)),
        "NFNet row (2 crops, mix, RandAugment)": (
            lambda: nfnet_rows(images, size, args.magnitude), len(images) // 2),
        "NFNet row, host part of augment_on_device": (
            lambda: nfnet_rows(images, size, args.magnitude, on_device=True), len(images) // 2),
    }
    tf_run = tf_data_runner(images, size)
    if tf_run is not None:
        variants["tf.data decode_and_crop+resize"] = (tf_run, len(images))
    cores = os.cpu_count() or 1
    grain = {on_device: grain_runner(images, size, args.magnitude, batch=8, cores=cores,
                                     on_device=on_device) for on_device in (False, True)}

    times = {name: [] for name in variants}
    grain_times = {on_device: [] for on_device in grain}
    for _ in range(args.rounds):
        for name, (fn, _) in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        for on_device, (run, _) in grain.items():
            grain_times[on_device].append(run())

    print(f"{len(images)} JPEGs (ImageNet shapes), {size} px, RandAugment 4 x "
          f"{args.magnitude:g}, median of {args.rounds} rounds, one thread:")
    rates = {}
    for name, (_, count) in variants.items():
        rates[name] = count / statistics.median(times[name])
        print(f"  {name:42s} {rates[name]:8.1f} /s per core")
    for on_device, (_, grain_rows) in grain.items():
        grain_rate = grain_rows / statistics.median(grain_times[on_device]) / cores
        label = (f"grain, NFNet rows, {cores} worker processes"
                 + (", augment_on_device" if on_device else ""))
        print(f"  {label:42s} {grain_rate:8.1f} /s per core")
    row_rate = rates["NFNet row (2 crops, mix, RandAugment)"]
    host_part = rates["NFNet row, host part of augment_on_device"]
    print("Cores to feed NFNet-F0 at its published speed with NFNet rows:")
    for device, needed in PUBLISHED_F0.items():
        line = (f"  {device}: {needed:.0f} img/s -> {needed / row_rate:.1f} cores (this code), "
                f"{needed / host_part:.1f} with augment_on_device")
        if tf_run is not None:
            tf_crop = rates["tf.data decode_and_crop+resize"]
            ours_crop = rates["decode+crop+resize"]
            # tf.data's crop stage speed-up applied to the two crops of a row.
            line += f", crop stage alone: ours {2 * needed / ours_crop:.1f}, " \
                    f"tf.data {2 * needed / tf_crop:.1f}"
        print(line)


if __name__ == "__main__":
    main()
