"""CLIP image preprocessing in PIL + numpy, NHWC.

Reproduces `transformers.CLIPImageProcessor()` (its PIL backend, the 4.x "slow" processor the
PreFLMR checkpoints were evaluated with) bit for bit, without importing torch or transformers:

  convert to RGB (transparency composited on white) -> resize the shortest side to
  `image_size` (PIL bicubic on uint8, long side `int(size * long / short)`) -> centre crop
  `image_size` x `image_size` (offsets floor((dim - crop) / 2)) -> x / 255 -> (x - mean) / std.

The output is `[B, H, W, 3]` float32 (NHWC, what Flax convolutions take); HF returns NCHW.
"""

from typing import Sequence, Union

import numpy as np
from PIL import Image

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESCALE = 1 / 255

ImageLike = Union[Image.Image, np.ndarray]


def _pil_to_rgb(image: Image.Image) -> Image.Image:
  # As transformers' `convert_to_rgb`: any alpha band or palette transparency is
  # composited onto opaque white; everything else goes through PIL's `convert`.
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
  """uint8 `[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]` (channels last) to RGB."""
  if array.dtype != np.uint8:
    raise TypeError(f"numpy images must be uint8, got {array.dtype}")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"numpy images must be [H, W] or [H, W, 1|3|4], got shape {array.shape}")
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  elif array.shape[-1] == 4:
    # transformers' numpy path: float blend onto white, then round (not PIL's integer blend).
    alpha = array[..., 3:4] / 255
    array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def _to_rgb(image: ImageLike) -> Image.Image:
  if isinstance(image, Image.Image):
    return _pil_to_rgb(image)
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image)
  raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """(height, width) with the short side at `shortest_edge`; HF truncates the long side."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(shortest_edge * long / short)
  return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def _resize_and_crop(image: Image.Image, image_size: int) -> np.ndarray:
  width, height = image.size
  if width == 0 or height == 0:
    raise ValueError(f"image has an empty side: {width}x{height}")
  new_h, new_w = resize_output_size(height, width, image_size)
  resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
  # The short side equals the crop, so the crop always fits (no padding case).
  top = (new_h - image_size) // 2
  left = (new_w - image_size) // 2
  return resized[top:top + image_size, left:left + image_size]


def _normalize(pixels: np.ndarray) -> np.ndarray:
  # Same arithmetic as HF: rescale in float64, cast to float32, normalise in float32.
  x = (pixels.astype(np.float64) * _RESCALE).astype(np.float32)
  mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)
  std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)
  return (x - mean) / std


def preprocess_image(image: ImageLike, image_size: int = 224) -> np.ndarray:
  """One image (PIL in any mode, or uint8 HWC array) to `[image_size, image_size, 3]` float32."""
  return _normalize(_resize_and_crop(_to_rgb(image), image_size))


def preprocess_images(images: Sequence[ImageLike], image_size: int = 224) -> np.ndarray:
  """A batch of images to CLIP pixel values `[B, image_size, image_size, 3]` float32 (NHWC).

  Equal to `CLIPImageProcessor(size={"shortest_edge": n}, crop_size={"height": n,
  "width": n})(images)["pixel_values"]` transposed to NHWC.
  """
  if isinstance(images, (Image.Image, str, bytes)):
    raise TypeError("preprocess_images takes a sequence of images; wrap a single image in a list.")
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  images = list(images)
  if not images:
    raise ValueError("Empty batch of images.")
  out = np.empty((len(images), image_size, image_size, 3), dtype=np.float32)
  for i, image in enumerate(images):
    try:
      out[i] = preprocess_image(image, image_size)
    except TypeError as e:
      raise TypeError(f"image {i} of the batch: {e}") from e
    except (ValueError, OSError) as e:
      raise ValueError(f"image {i} of the batch: {e}") from e
  return out


def black_image(image_size: int = 224) -> np.ndarray:
  """Pixel values `[image_size, image_size, 3]` of an all-black image (text-only queries)."""
  black = _normalize(np.zeros((1, 1, 3), dtype=np.uint8))
  return np.broadcast_to(black, (image_size, image_size, 3)).copy()


def blank_pixel_values(batch: int, image_size: int = 224) -> np.ndarray:
  """`[batch, image_size, image_size, 3]` black-image pixel values."""
  return np.broadcast_to(black_image(image_size), (batch, image_size, image_size, 3)).copy()
