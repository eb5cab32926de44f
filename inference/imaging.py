"""The one decode/resize function: training's evaluation, export parity, the service and batch scoring all call it.

Policy (documented in the README):
- Accepted formats: JPEG, PNG, WebP. Anything else is refused before decoding.
- The pixel count is checked from the header before decoding; Pillow's decompression-bomb warning is an error.
- EXIF orientation is applied.
- Colour: every mode becomes 8-bit RGB. Transparency (RGBA, LA, palette with a transparent colour) is
  composited onto white; 16-bit and 32-bit integer images are scaled to 8 bits (not clipped); CMYK and
  YCbCr are converted by Pillow; grayscale is replicated to three channels.
- Size: the image is scaled so that it covers the model's (H, W) and centre-cropped (aspect ratio kept),
  with bilinear filtering (antialiased when shrinking). An image already of size (H, W) is untouched.

Decoding: Pillow reads every header and applies the policy. The common JPEG (YCbCr or grayscale, no EXIF
rotation) is then decoded by simplejpeg, which calls the same libjpeg-turbo with the same settings without
Pillow's Python-level work: the same pixels (tested; equal on all 10,000 CIFAR-10 test JPEGs) in about a third of
the time for small images, which matters where decoding is most of the work (the service's event loop, batch
scoring of small images). Anything libjpeg-turbo only warns about is left to Pillow, which decides as before.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB of RGB


class OpenedImage(NamedTuple):
    """An image whose header passed the checks (open_image), not decoded yet, with the bytes it came from."""

    image: Image.Image
    data: bytes

    @property
    def pixel_count(self) -> int:
        return self.image.width * self.image.height


class ImageDecodeError(ValueError):
    """An input that cannot become model pixels. `reason` is one of: empty, unsupported_format, corrupt, too_large."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(
    data: bytes,
    size: tuple[int, int],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB array of the model's `size` = (H, W)."""
    return to_pixels(open_image(data, max_pixels=max_pixels), size)


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> OpenedImage:
    """Read and check the header only (format, pixel count); nothing is decoded yet. Finish with to_pixels."""
    if not data:
        raise ImageDecodeError("empty", "the image is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=None)
        except UnidentifiedImageError:
            raise ImageDecodeError("unsupported_format", "the bytes are not an image in a known format") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("too_large", "the image header declares too many pixels") from None
        except (OSError, SyntaxError, ValueError) as exc:  # a recognised header cut short or malformed
            raise ImageDecodeError("corrupt", f"the image header is truncated or corrupt: {exc}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ImageDecodeError(
            "unsupported_format",
            f"image format {image.format} is not accepted; send one of {sorted(ACCEPTED_FORMATS)}",
        )
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large", f"the image has {width}x{height} pixels, more than the limit of {max_pixels}"
        )
    return OpenedImage(image, data)


def to_pixels(opened: OpenedImage, size: tuple[int, int]) -> np.ndarray:
    """An image from open_image -> (H, W, 3) uint8: decoded, EXIF-oriented, converted to RGB, resized."""
    pixels = plain_jpeg_pixels(opened)
    if pixels is None:
        return pillow_pixels(opened.image, size)
    height, width = size
    return pixels if pixels.shape[:2] == (height, width) else resize_to(Image.fromarray(pixels), size)


def pillow_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """to_pixels by Pillow alone: any accepted image, decoded, EXIF-oriented, converted to RGB, resized."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError("too_large", "the image decodes to too many pixels") from None
        except (OSError, SyntaxError, ValueError) as exc:  # Pillow's ways of saying truncated or corrupt
            raise ImageDecodeError("corrupt", f"the image is truncated or corrupt: {exc}") from None
    return resize_to(rgb, size)


def plain_jpeg_pixels(opened: OpenedImage) -> np.ndarray | None:
    """(h, w, 3) uint8 RGB at the image's own size, decoded by simplejpeg, for a YCbCr or grayscale JPEG without an
    EXIF rotation; None for anything else (CMYK, rotated, or damaged enough that libjpeg-turbo warns), which
    pillow_pixels decodes."""
    image = opened.image
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            return None
    except Exception:  # malformed EXIF in a hostile file: Pillow's path reports it as it always has
        return None
    try:
        # strict: libjpeg-turbo's warnings (corrupt or truncated data) raise instead of decoding on.
        return simplejpeg.decode_jpeg(opened.data, colorspace="RGB", strict=True)
    except ValueError:
        return None


def resize_to(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB image -> (H, W, 3) uint8, scaled to cover (H, W) and centre-cropped."""
    height, width = size
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's convert() clips 16/32-bit values at 255; scale to the full 8-bit range instead.
        pixels = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        peak = 0xFFFF if image.mode != "I" else max(int(pixels.max()), 1)
        image = Image.fromarray((pixels.astype(np.float64) * (255.0 / peak)).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; lossless, so decode_image gives the same pixels back (tests, fixtures)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
