"""Image augmentation and preprocessing in NumPy and PIL.

Every random choice comes from a caller's `np.random.Generator`, so the pipeline decides how
randomness is seeded (per example, per batch) and results are reproducible.

Two reference pipelines are reproduced, chosen by `image_ops`:
- "tf": the TensorFlow pipelines of the NFNet and EfficientNet papers: TF's crop sampler
  (`tf.image.sample_distorted_bounding_box`) with a padded centre crop when it fails, and TF's
  bicubic resize to unclamped float32 (`data.resize.tf_bicubic`);
- "torchvision": `RandomResizedCrop`, `Resize` and `CenterCrop` on PIL images (uint8).
"""

import math

import numpy as np

from data import resize

IMAGE_OPS = ("tf", "torchvision")
INCEPTION_ASPECT_RANGE = (3 / 4, 4 / 3)
INCEPTION_ATTEMPTS = 10
# TF pipelines also require the crop to cover this fraction of the (whole-image) object box.
TF_MIN_OBJECT_COVERED = 0.1
# NFNet eval resizes the whole image to test_size + 32; TF's centre crop keeps size/(size + 32).
NFNET_EVAL_MARGIN = 32
CENTRE_CROP_PADDING = 32


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HWC uint8 with 3 channels (grayscale datasets such as MNIST have 1 or none)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's CenterCrop offsets: round((size - crop) / 2)."""
    top = int(round((image.shape[0] - height) / 2.0))
    left = int(round((image.shape[1] - width) / 2.0))
    return image[top:top + height, left:left + width]


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    min_area: float,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    attempts: int = INCEPTION_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (top, left, height, width).

    Area uniform in [min_area, 1] of the image, aspect ratio log-uniform in aspect_range; after
    `attempts` misses, the largest centred crop within the aspect range.
    """
    area = height * width
    log_low, log_high = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(min_area, 1.0)
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    image_aspect = width / height
    if image_aspect < aspect_range[0]:
        crop_width, crop_height = width, round(width / aspect_range[0])
    elif image_aspect > aspect_range[1]:
        crop_width, crop_height = round(height * aspect_range[1]), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _tf_crop_of_height(rng: np.random.Generator, height: int, width: int, aspect: float,
                       min_pixels: float, max_pixels: float) -> tuple[int, int] | None:
    """One attempt of TF's GenerateRandomCrop: (crop height, crop width), or None."""
    min_height = round(math.sqrt(min_pixels / aspect))
    max_height = round(math.sqrt(max_pixels / aspect))
    if round(max_height * aspect) > width:
        # The largest height whose rounded width still fits.
        max_height = int((width + 0.5 - 1e-7) / aspect)
        if round(max_height * aspect) > width:
            max_height -= 1
    max_height = min(max_height, height)
    min_height = min(min_height, max_height)
    crop_height = int(rng.integers(min_height, max_height + 1))
    crop_width = round(crop_height * aspect)
    if crop_width * crop_height < min_pixels:
        crop_height += 1
        crop_width = round(crop_height * aspect)
    if crop_width * crop_height > max_pixels:
        crop_height -= 1
        crop_width = round(crop_height * aspect)
    area = crop_width * crop_height
    if (area < min_pixels or area > max_pixels or not 0 < crop_width <= width
            or not 0 < crop_height <= height):
        return None
    return crop_height, crop_width


def tf_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    min_area: float,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    attempts: int = INCEPTION_ATTEMPTS,
    min_object_covered: float = TF_MIN_OBJECT_COVERED,
) -> tuple[int, int, int, int]:
    """tf.image.sample_distorted_bounding_box over the whole image, as (top, left, h, w).

    Unlike torchvision it draws the aspect ratio (width / height) uniformly and then the crop
    height uniformly among the heights whose area is in range; offsets are uniform in
    [0, size - crop) (the last offset is never drawn). After `attempts` misses it returns the
    whole image.
    """
    pixels = height * width
    for _ in range(attempts):
        aspect = rng.uniform(*aspect_range)
        crop = _tf_crop_of_height(rng, height, width, aspect, min_area * pixels, pixels)
        if crop is None or crop[0] * crop[1] < min_object_covered * pixels:
            continue
        crop_height, crop_width = crop
        top = int(rng.integers(0, height - crop_height)) if crop_height < height else 0
        left = int(rng.integers(0, width - crop_width)) if crop_width < width else 0
        return top, left, crop_height, crop_width
    return 0, 0, height, width


def padded_centre_crop_box(height: int, width: int, size: int,
                           padding: int = CENTRE_CROP_PADDING) -> tuple[int, int, int, int]:
    """The TF pipelines' centre crop: the central size / (size + padding) of the shorter side,
    square (offsets round up)."""
    side = int(min(height, width) / (size + padding) * size)
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def train_crop_box(rng: np.random.Generator, height: int, width: int, image_ops: str,
                   min_area: float, size: int) -> tuple[int, int, int, int]:
    """The Inception crop of either reference pipeline."""
    if image_ops == "torchvision":
        return random_resized_crop_box(rng, height, width, min_area)
    box = tf_crop_box(rng, height, width, min_area)
    if box[2:] == (height, width):
        # The NFNet / EfficientNet pipelines treat a whole-image crop as a failed draw.
        return padded_centre_crop_box(height, width, size)
    return box


def resize_to(image: np.ndarray, size: int, image_ops: str, interpolation: str) -> np.ndarray:
    """Square float32 resize: TF's unclamped bicubic, or PIL's uint8 resampling."""
    if image_ops == "tf":
        if interpolation != "bicubic":
            raise ValueError(f"image_ops 'tf' resizes bicubically (the NFNet and EfficientNet "
                             f"pipelines); got interpolation {interpolation!r}")
        return resize.tf_bicubic(image, size, size)
    return resize.pil(image, size, size, interpolation).astype(np.float32)


def flip(image: np.ndarray) -> np.ndarray:
    return image[:, ::-1]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return flip(image) if rng.random() < 0.5 else image


PAD_FILLS = ("mean", "zeros", "reflect")


def random_pad_crop(image: np.ndarray, rng: np.random.Generator, pad: int, fill: str,
                    mean: tuple[float, ...]) -> np.ndarray:
    """The CIFAR papers' translation augmentation: the image padded by `pad` px on every side,
    then cropped back to its size at an offset uniform over the 2 * pad + 1 positions of each
    axis. `fill`: "mean" (the `mean` colour: fb.resnet.torch, whose DenseNet code zero-pads
    after normalising), "zeros" (black: torchvision's RandomCrop(padding=) on PIL images) or
    "reflect" (the Wide ResNet code's reflection)."""
    height, width = image.shape[:2]
    pads = ((pad, pad), (pad, pad), (0, 0))
    if fill == "reflect":
        padded = np.pad(image, pads, mode="reflect")
    else:
        padded = np.pad(image, pads)
        if fill == "mean":
            padded[:pad], padded[pad + height:] = mean, mean
            padded[:, :pad], padded[:, pad + width:] = mean, mean
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top:top + height, left:left + width]


def resize_crop_32(image: np.ndarray, size: int, image_ops: str,
                   interpolation: str) -> np.ndarray:
    """NFNet eval: the whole image (aspect not kept) to size + 32 square, centre size crop."""
    margin_size = size + NFNET_EVAL_MARGIN
    if image_ops == "tf":
        resized = resize_to(image, margin_size, image_ops, interpolation)
        offset = (NFNET_EVAL_MARGIN + 1) // 2
        return resized[offset:offset + size, offset:offset + size]
    resized = resize.pil(image, margin_size, margin_size, interpolation)
    return centre_crop(resized, size, size).astype(np.float32)


def crop_resize(image: np.ndarray, size: int, image_ops: str, interpolation: str) -> np.ndarray:
    """TF pipelines' eval: padded centre crop (size / (size + 32) of the shorter side), resized."""
    top, left, height, width = padded_centre_crop_box(image.shape[0], image.shape[1], size)
    return resize_to(image[top:top + height, left:left + width], size, image_ops, interpolation)


def resize_shorter_crop(image: np.ndarray, size: int, crop_fraction: float,
                        interpolation: str) -> np.ndarray:
    """torchvision eval: Resize(floor(size / crop_fraction)) on the shorter side (the longer
    side truncated, as torchvision does), then CenterCrop(size)."""
    height, width = image.shape[:2]
    shorter = math.floor(size / crop_fraction + 1e-6)
    if height <= width:
        new_height, new_width = shorter, int(shorter * width / height)
    else:
        new_height, new_width = int(shorter * height / width), shorter
    resized = resize.pil(image, new_height, new_width, interpolation)
    return centre_crop(resized, size, size).astype(np.float32)


EVAL_PREPROCESSORS = ("resize_crop_32", "crop_resize", "resize_shorter_crop")


def eval_preprocess(image: np.ndarray, method: str, size: int, crop_fraction: float,
                    image_ops: str, interpolation: str) -> np.ndarray:
    """uint8 HWC -> float32 (size, size, 3), before normalisation."""
    if method == "resize_crop_32":
        return resize_crop_32(image, size, image_ops, interpolation)
    if method == "crop_resize":
        return crop_resize(image, size, image_ops, interpolation)
    if method == "resize_shorter_crop":
        return resize_shorter_crop(image, size, crop_fraction, interpolation)
    raise ValueError(f"unknown eval preprocessing {method!r}; choose from {EVAL_PREPROCESSORS}")


def normalize(images, mean, std):
    """(images - mean) / std in float32, with mean and std in 0..255 pixel units, as a
    multiplication by the float32 reciprocal of std: what XLA makes of a division by a
    constant, so data.device_augment's normalisation is this one to the bit. NumPy arrays or
    JAX arrays in, the same kind out."""
    mean = np.asarray(mean, np.float32)
    scale = np.float32(1.0) / np.asarray(std, np.float32)
    return (images.astype(np.float32) - mean) * scale


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


MIX_KINDS = ("mixup", "cutmix")


def mix_kind(row: int, use_mixup: bool, use_cutmix: bool) -> str | None:
    """Which mixing a global batch row gets: with both, MixUp on even rows and CutMix on odd
    ones, so every device's even-sized shard is half and half (the official code mixes the
    first and second half of each device batch)."""
    if use_mixup and use_cutmix:
        return MIX_KINDS[row % 2]
    if use_mixup:
        return "mixup"
    return "cutmix" if use_cutmix else None


def draw_mix(kind: str, rng: np.random.Generator, alpha: float, height: int,
             width: int) -> tuple[float, tuple[int, int, int, int] | None]:
    """A row's random mixing: (lambda, the CutMix box or None for MixUp). MixUp (Zhang et al.
    2018): lambda ~ Beta(alpha, alpha) weighs the first image. CutMix (Yun et al. 2019): the box
    comes from the first image, the rest from the second, and lambda is the box's share of the
    image, so the targets weigh exactly the pixels each image shows."""
    if kind == "mixup":
        return float(rng.beta(alpha, alpha)), None
    if kind == "cutmix":
        top, left, box_height, box_width = box = cutmix_box(rng, height, width)
        return box_height * box_width / (height * width), box
    raise ValueError(f"unknown mixing {kind!r}; choose from {MIX_KINDS}")


def mix_images(first: np.ndarray, second: np.ndarray, lam: float,
               box: tuple[int, int, int, int] | None) -> np.ndarray:
    """`draw_mix`'s mixing of two images of one shape."""
    if box is None:
        return (np.float32(lam) * first + np.float32(1.0 - lam) * second).astype(first.dtype)
    top, left, box_height, box_width = box
    mixed = second.copy()
    mixed[top:top + box_height, left:left + box_width] = (
        first[top:top + box_height, left:left + box_width])
    return mixed


def mix_targets(first: np.ndarray, second: np.ndarray, lam: float) -> np.ndarray:
    return np.float32(lam) * first + np.float32(1.0 - lam) * second


def mixup_pair(first: np.ndarray, second: np.ndarray, rng: np.random.Generator,
               alpha: float) -> tuple[np.ndarray, float]:
    lam, box = draw_mix("mixup", rng, alpha, *first.shape[:2])
    return mix_images(first, second, lam, box), lam


def cutmix_box(rng: np.random.Generator, height: int,
               width: int) -> tuple[int, int, int, int]:
    """CutMix box (top, left, height, width): side ratio sqrt(1 - U), centre uniform, clipped
    to the image (so it may be smaller than drawn)."""
    centre_x, centre_y = int(rng.integers(0, width)), int(rng.integers(0, height))
    cut_ratio = math.sqrt(1.0 - rng.uniform())
    cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
    top, bottom = max(centre_y - cut_height // 2, 0), min(centre_y + cut_height // 2, height)
    left, right = max(centre_x - cut_width // 2, 0), min(centre_x + cut_width // 2, width)
    return top, left, bottom - top, right - left


def cutmix_pair(first: np.ndarray, second: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, float]:
    lam, box = draw_mix("cutmix", rng, 0.0, *first.shape[:2])
    return mix_images(first, second, lam, box), lam


def mix_pair(kind: str, first: np.ndarray, second: np.ndarray, first_target: np.ndarray,
             second_target: np.ndarray, rng: np.random.Generator,
             mixup_alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One mixed row: (image, lambda * first_target + (1 - lambda) * second_target)."""
    lam, box = draw_mix(kind, rng, mixup_alpha, *first.shape[:2])
    return mix_images(first, second, lam, box), mix_targets(first_target, second_target, lam)
