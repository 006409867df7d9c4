"""Images of the cold-start set resized as LLaMA-Factory resizes them for Qwen2-VL.

Vision-R1's cold start ran in LLaMA-Factory, which resizes every image before the
model's image processor sees it (``mm_plugin.BasePlugin._preprocess_image`` and
``Qwen2VLPlugin._preprocess_image``):

1. above ``image_max_pixels`` (default 768 x 768), scaled down to that area; below
   ``image_min_pixels`` (32 x 32), scaled up; sides truncated to integers;
2. a side under 28 pixels raised to 28;
3. an aspect ratio above 200 (which Qwen's ``smart_resize`` refuses with ``ValueError``)
   squeezed to 180:1, the short side kept.

The processor's own ``smart_resize`` then rounds each side to a multiple of 28 (its
``max_pixels`` is left as the model ships it, as LLaMA-Factory leaves it), so a 1920 x
1080 screenshot costs 777 image tokens rather than 2,691, and a 4000 x 3000 photo 768
rather than 15,301. LLaMA-Factory resizes step by step; we resize once to the final size
(the same token count; resampling differs by a filter pass). ``preprocess_size`` is the size arithmetic alone (the
token count is planned from it without decoding the image); ``preprocess_image`` applies
it to a decoded image with PIL's default (bicubic) filter, as LLaMA-Factory does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_SIDE = 28  # Qwen2-VL's patch (14) x merge (2)
MAX_RATIO = 200  # smart_resize raises above this
SQUEEZED_RATIO = 180


@dataclass(frozen=True)
class ImageBounds:
    """``sft.imageMaxPixels`` and ``sft.imageMinPixels``."""

    max_pixels: int = 768 * 768
    min_pixels: int = 32 * 32


def preprocess_size(width: int, height: int, bounds: ImageBounds) -> tuple[int, int]:
    """The (width, height) LLaMA-Factory resizes a ``width`` x ``height`` image to."""
    if width * height > bounds.max_pixels:
        factor = math.sqrt(bounds.max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if width * height < bounds.min_pixels:
        factor = math.sqrt(bounds.min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min(width, height) < MIN_SIDE:
        width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)
    if width / height > MAX_RATIO:
        width = height * SQUEEZED_RATIO
    if height / width > MAX_RATIO:
        height = width * SQUEEZED_RATIO
    return width, height


def preprocess_image(image, bounds: ImageBounds):
    """``image`` (PIL, RGB) at ``preprocess_size``; the same object when nothing changes."""
    size = preprocess_size(image.width, image.height, bounds)
    return image if size == image.size else image.resize(size)
