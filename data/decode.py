"""Images as sources hold them: encoded bytes (JPEG, PNG, ...) or decoded uint8 arrays.

Sources are read with image decoding skipped, so the train pipeline learns an image's size
from its header and decodes only once it knows the crop.
"""

import io

import numpy as np
from PIL import Image

from data import augment

Box = tuple[int, int, int, int]   # top, left, height, width


def image_size(image: bytes | np.ndarray) -> tuple[int, int]:
    """(height, width), from the header alone for encoded images."""
    if isinstance(image, np.ndarray):
        return image.shape[0], image.shape[1]
    with Image.open(io.BytesIO(image)) as opened:
        width, height = opened.size
    return height, width


def decode(image: bytes | np.ndarray, box: Box | None = None) -> np.ndarray:
    """uint8 HWC RGB pixels of `box` (the whole image by default)."""
    if isinstance(image, np.ndarray):
        pixels = augment.to_rgb(image)
        if box is not None:
            top, left, height, width = box
            pixels = pixels[top:top + height, left:left + width]
        return pixels
    with Image.open(io.BytesIO(image)) as opened:
        if box is not None:
            top, left, height, width = box
            opened = opened.crop((left, top, left + width, top + height))
        # Grayscale and CMYK JPEGs exist in ImageNet; PIL converts them like TF's channels=3.
        if opened.mode != "RGB":
            opened = opened.convert("RGB")
        return np.asarray(opened)
