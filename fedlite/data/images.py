"""Reading smear images and turning them into model input, without torch.

The hospital agent preprocesses with exactly this code, so training and deployment see the same
pixels. Mode conversions happen only where they lose nothing; anything else is an InputError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedlite.errors import InputError

IMAGE_SIZE = 224
# timm's ViT-B/16 (augreg) normalisation; recorded in checkpoints and bundles.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MIN_SIDE = 16
# The largest image decoded (8192 x 8192): checked from the header before decoding, so a
# decompression bomb costs nothing; PIL's own warning and error above its limit are ours instead.
MAX_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = None




def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """Convert to RGB where that is lossless; refuse where it would change what a clinician sees."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("L", "P", "1"):
        return img.convert("RGB")
    if mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:
            raise InputError("image has transparent pixels; their colour is undefined",
                             path=path, hint="flatten it onto the slide background and save as RGB")
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise InputError(f"{mode} image ({'16' if mode.startswith('I;16') else '32'}-bit); smears are "
                         "read as 8-bit RGB and rescaling would change their intensities",
                         path=path, hint="export the image as 8-bit RGB (PNG or JPEG)")
    raise InputError(f"unsupported image mode {mode}", path=path, hint="save it as 8-bit RGB")


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3), with a clear error for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise InputError("image file not found", path=path)
    try:
        with Image.open(path) as img:
            width, height = img.size  # read from the header: nothing is decoded yet
            if width * height > MAX_PIXELS:
                raise InputError(f"image is {width}x{height} pixels ({width * height / 1e6:.0f} MP), over the "
                                 f"{MAX_PIXELS / 1e6:.0f} MP fedlite decodes", path=path,
                                 hint="downscale the scan (smears are read at a few hundred pixels a side)")
            img.load()
            rgb = _to_rgb(img, path)
            array = np.asarray(rgb, dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot decode image: {exc}", path=path,
                         hint="the file is corrupt or not an image") from None
    if min(array.shape[:2]) < MIN_SIDE:
        raise InputError(f"image is only {array.shape[1]}x{array.shape[0]} pixels", path=path,
                         hint=f"smears need at least {MIN_SIDE}px per side")
    return array


def resize(array: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    if array.shape[0] == size and array.shape[1] == size:
        return array
    return np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))


def normalize(array: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """uint8 HWC -> float32 CHW in the encoder's normalisation."""
    x = array.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(path: str | Path, size: int = IMAGE_SIZE, mean=MEAN, std=STD) -> np.ndarray:
    """File -> float32 (3, size, size): the single preprocessing path for training and agents."""
    return normalize(resize(load_image(path), size), mean, std)
