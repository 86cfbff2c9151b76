"""Images as sources hold them: encoded bytes (JPEG, PNG, ...) or decoded uint8 arrays.

Sources are read with image decoding skipped, so the train pipeline learns an image's size
from its header and decodes only once it knows the crop.

Every image becomes uint8 RGB: grayscale, palette and CMYK images convert to RGB (as TF's
`decode_image(channels=3)` does); 16-bit grayscale (PNG, TIFF) is scaled to 8 bits
(value * 255 / 65535, rounded), not clipped; an image with transparency (RGBA, LA, or a palette
or tRNS transparent colour) is composited onto `ALPHA_BACKGROUND` (white, as a browser shows it
on a plain page) rather than having its alpha dropped, which would expose whatever colour the
transparent pixels happen to store.

An image that cannot be decoded (truncated, corrupt, not an image at all) or that has more than
`max_pixels` pixels raises `UnreadableImageError`, whose message says why; the example makers
(data/classification.py) add which example of which dataset it was.
"""

import io
import re
import struct

import numpy as np
from PIL import Image

from data import augment

Box = tuple[int, int, int, int]   # top, left, height, width

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS, 1024**3 // 4 // 3 pixels,
# about 9459 x 9459), made explicit: the default of data.max_image_pixels. 0 means no limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# What transparent pixels are composited onto.
ALPHA_BACKGROUND = (255, 255, 255)
# What PIL raises on broken files: OSError (truncated data, UnidentifiedImageError), SyntaxError
# (broken PNG chunks), and from some plugins ValueError, EOFError, struct.error, IndexError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                  TypeError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class UnreadableImageError(ValueError):
    """An image that cannot be decoded: truncated, corrupt, not an image, or over the pixel
    limit (data.max_image_pixels). The message is one line; raised by the input pipeline with the
    dataset, split, example index (and file, for image folders) named."""


def _allow_in_pil(max_pixels: int) -> None:
    # PIL refuses (warns above its limit, raises above twice it) before we can look at the size;
    # a larger configured limit must be PIL's too. PIL's limit is only ever raised here.
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (not max_pixels or max_pixels > current):
        Image.MAX_IMAGE_PIXELS = max_pixels or None


def _reason(error: Exception, image: bytes) -> str:
    if isinstance(error, Image.UnidentifiedImageError):
        return (f"not an image file PIL can identify ({len(image)} bytes starting with "
                f"{image[:12]!r})")
    if isinstance(error, Image.DecompressionBombError):
        return f"{error}"
    return f"cannot decode it: {type(error).__name__}: {error}"


def _over_limit(pixels: int, size: str, max_pixels: int) -> UnreadableImageError:
    return UnreadableImageError(
        f"the image is {size}{pixels:,} pixels, over the limit of {max_pixels:,} pixels "
        f"(data.max_image_pixels; PIL's decompression-bomb guard)")


def _open(image: bytes, max_pixels: int) -> Image.Image:
    """The image with its header read, its size within the limit."""
    _allow_in_pil(max_pixels)
    try:
        opened = Image.open(io.BytesIO(image))
    except Image.DecompressionBombError as error:
        # Above twice PIL's limit, PIL refuses to open it at all; its message has the count.
        found = re.search(r"\((\d+) pixels\)", str(error))
        if found:
            raise _over_limit(int(found.group(1)), "", max_pixels) from error
        raise UnreadableImageError(_reason(error, image)) from error
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(_reason(error, image)) from error
    width, height = opened.size
    if max_pixels and width * height > max_pixels:
        opened.close()
        raise _over_limit(width * height, f"{width}x{height} = ", max_pixels)
    return opened


def _to_rgb(opened: Image.Image) -> np.ndarray:
    """uint8 HWC RGB pixels of a PIL image of any mode."""
    if opened.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: PIL's convert("RGB") would clip every value above 255 to white.
        # ("I", 32-bit, is how PIL hands over some 16-bit files; values are read as 16-bit.)
        values = np.asarray(opened).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if opened.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in opened.info:
        rgba = np.asarray(opened.convert("RGBA")).astype(np.float32)
        alpha = rgba[:, :, 3:] / 255.0
        background = np.asarray(ALPHA_BACKGROUND, np.float32)
        blended = rgba[:, :, :3] * alpha + background * (1.0 - alpha)
        return np.rint(blended).astype(np.uint8)
    # Grayscale, palette and CMYK (ImageNet has CMYK JPEGs): PIL's conversion, like TF's
    # decode_image(channels=3).
    return np.asarray(opened if opened.mode == "RGB" else opened.convert("RGB"))


def conversion(image: bytes | np.ndarray,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """What `decode` converts to RGB, in words ("CMYK", "RGBA, transparency composited onto
    white"), from the header alone; None for an RGB image."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
            return "grayscale"
        if image.ndim == 3 and image.shape[-1] == 3:
            return None
        raise UnreadableImageError(f"a decoded image must be [H, W], [H, W, 1] or [H, W, 3] "
                                   f"pixels, got shape {image.shape}")
    with _open(image, max_pixels) as opened:
        mode, transparent = opened.mode, "transparency" in opened.info
    if mode in _SIXTEEN_BIT_MODES:
        return f"16-bit grayscale ({mode}), scaled to 8 bits"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparent:
        return f"{mode}, transparency composited onto white"
    if mode == "RGB":
        return None
    return {"L": "grayscale", "1": "black-and-white", "P": "palette"}.get(mode, mode)


def image_size(image: bytes | np.ndarray,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width), from the header alone for encoded images."""
    if isinstance(image, np.ndarray):
        return image.shape[0], image.shape[1]
    with _open(image, max_pixels) as opened:
        width, height = opened.size
    return height, width


def decode(image: bytes | np.ndarray, box: Box | None = None,
           max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """uint8 HWC RGB pixels of `box` (the whole image by default); see the module's docstring
    for the modes it converts and `UnreadableImageError` for what it refuses."""
    if isinstance(image, np.ndarray):
        pixels = augment.to_rgb(image)
        if box is not None:
            top, left, height, width = box
            pixels = pixels[top:top + height, left:left + width]
        return pixels
    with _open(image, max_pixels) as opened:
        try:
            if box is not None:
                top, left, height, width = box
                return _to_rgb(opened.crop((left, top, left + width, top + height)))
            return _to_rgb(opened)
        except _DECODE_ERRORS as error:
            raise UnreadableImageError(_reason(error, image)) from error
