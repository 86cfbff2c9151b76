"""Image augmentation and preprocessing in NumPy and PIL.

Every random choice comes from a caller's `np.random.Generator`, so the pipeline decides how
randomness is seeded (per example, per batch) and results are reproducible.
"""

import math

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
INCEPTION_ASPECT_RANGE = (3 / 4, 4 / 3)
INCEPTION_ATTEMPTS = 10
# NFNet eval: resize the whole image to test_size + 32 and take the centre test_size.
NFNET_EVAL_MARGIN = 32


def _resample(interpolation: str) -> Image.Resampling:
    try:
        return INTERPOLATIONS[interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; choose from {sorted(INTERPOLATIONS)}"
        ) from None


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HWC uint8 with 3 channels (grayscale datasets such as MNIST have 1 or none)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def resize(image: np.ndarray, height: int, width: int, interpolation: str,
           box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Resizes (the `box` = (top, left, height, width) region of) an HWC uint8 image."""
    pil_box = None
    if box is not None:
        top, left, box_height, box_width = box
        pil_box = (left, top, left + box_width, top + box_height)
    # PIL crops and resizes in one pass when given a box, reading only the pixels it needs.
    resized = Image.fromarray(image).resize((width, height), _resample(interpolation), box=pil_box)
    return np.asarray(resized)


def centre_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top = (image.shape[0] - height) // 2
    left = (image.shape[1] - width) // 2
    return image[top:top + height, left:left + width]


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    min_area: float,
    aspect_range: tuple[float, float] = INCEPTION_ASPECT_RANGE,
    attempts: int = INCEPTION_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """Inception crop (Szegedy et al. 2015) as (top, left, height, width).

    Area uniform in [min_area, 1] of the image, aspect ratio log-uniform in aspect_range; after
    `attempts` misses, the largest centred crop within the aspect range (torchvision's fallback).
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


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        min_area: float, interpolation: str) -> np.ndarray:
    box = random_resized_crop_box(rng, image.shape[0], image.shape[1], min_area)
    return resize(image, size, size, interpolation, box=box)


def flip(image: np.ndarray) -> np.ndarray:
    return image[:, ::-1]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return flip(image) if rng.random() < 0.5 else image


def resize_crop_32(image: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    """NFNet eval: the whole image (aspect not kept) to size + 32 square, centre size crop."""
    resized = resize(image, size + NFNET_EVAL_MARGIN, size + NFNET_EVAL_MARGIN, interpolation)
    return centre_crop(resized, size, size)


def resize_shorter_crop(image: np.ndarray, size: int, crop_fraction: float,
                        interpolation: str) -> np.ndarray:
    """ResNet eval: shorter side to size / crop_fraction (aspect kept), centre size crop."""
    height, width = image.shape[:2]
    shorter = round(size / crop_fraction)
    scale = shorter / min(height, width)
    new_height = max(size, round(height * scale))
    new_width = max(size, round(width * scale))
    return centre_crop(resize(image, new_height, new_width, interpolation), size, size)


EVAL_PREPROCESSORS = ("resize_crop_32", "resize_shorter_crop")


def eval_preprocess(image: np.ndarray, method: str, size: int, crop_fraction: float,
                    interpolation: str) -> np.ndarray:
    if method == "resize_crop_32":
        return resize_crop_32(image, size, interpolation)
    if method == "resize_shorter_crop":
        return resize_shorter_crop(image, size, crop_fraction, interpolation)
    raise ValueError(f"unknown eval preprocessing {method!r}; choose from {EVAL_PREPROCESSORS}")


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """(images - mean) / std in float32, with mean and std in 0..255 pixel units."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (images.astype(np.float32) - mean) / std


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[np.asarray(labels)]


def mixup(images: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
          alpha: float) -> tuple[np.ndarray, np.ndarray, float]:
    """MixUp (Zhang et al. 2018) of a batch with its reverse; one lambda ~ Beta(alpha, alpha)."""
    lam = float(rng.beta(alpha, alpha))
    mixed = lam * images + (1.0 - lam) * images[::-1]
    return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * targets[::-1], lam


def cutmix_box(rng: np.random.Generator, height: int,
               width: int) -> tuple[int, int, int, int]:
    """CutMix (Yun et al. 2019) box (top, left, height, width): side ratio sqrt(1 - U),
    centre uniform, clipped to the image (so it may be smaller than drawn)."""
    cut_ratio = math.sqrt(1.0 - rng.uniform())
    cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
    centre_y, centre_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = max(centre_y - cut_height // 2, 0), min(centre_y + cut_height // 2, height)
    left, right = max(centre_x - cut_width // 2, 0), min(centre_x + cut_width // 2, width)
    return top, left, bottom - top, right - left


def cutmix(images: np.ndarray, targets: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Pastes one box of the reversed batch into each image; lambda is the area each keeps."""
    height, width = images.shape[1:3]
    top, left, box_height, box_width = cutmix_box(rng, height, width)
    # Recomputed from the clipped box, so the targets weigh exactly the pixels each image shows.
    lam = 1.0 - box_height * box_width / (height * width)
    mixed = images.copy()
    region = (slice(None), slice(top, top + box_height), slice(left, left + box_width))
    mixed[region] = images[::-1][region]
    return mixed, lam * targets + (1.0 - lam) * targets[::-1], lam


def mix_batch(images: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
              mixup_alpha: float, use_cutmix: bool) -> tuple[np.ndarray, np.ndarray]:
    """MixUp and/or CutMix as in the official NFNet code: with both, MixUp on the first half of
    the batch and CutMix on the second, each half paired with its own reverse; with one, the
    whole batch."""
    use_mixup = mixup_alpha > 0
    if use_mixup and use_cutmix:
        half = len(images) // 2
        first_images, first_targets, _ = mixup(images[:half], targets[:half], rng, mixup_alpha)
        second_images, second_targets, _ = cutmix(images[half:], targets[half:], rng)
        return (np.concatenate([first_images, second_images]),
                np.concatenate([first_targets, second_targets]))
    if use_mixup:
        images, targets, _ = mixup(images, targets, rng, mixup_alpha)
    elif use_cutmix:
        images, targets, _ = cutmix(images, targets, rng)
    return images, targets
