"""preflmr_jax.image_processing against transformers' CLIPImageProcessor (NCHW -> NHWC)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from preflmr_jax import image_processing as ip

SIZES = [(224, 224), (100, 50), (50, 100), (300, 500), (481, 640), (7, 300), (225, 223),
         (1, 1), (33, 31)]


def _hf(image_size):
  from transformers import CLIPImageProcessor  # Test-only oracle.
  return CLIPImageProcessor(size={"shortest_edge": image_size},
                            crop_size={"height": image_size, "width": image_size},
                            do_convert_rgb=True)


def _hf_pixels(processor, images):
  # One call per image: HF infers the channel axis of each numpy input separately.
  return np.stack([processor(im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
                   for im in images])


def _pil_images(h, w, rng):
  rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
  # Fully transparent and opaque pixels as well as partial alpha.
  rgba[..., 3][rgba[..., 3] < 60] = 0
  rgba[..., 3][rgba[..., 3] > 200] = 255
  rgb = Image.fromarray(rgba[..., :3])
  palette_t = rgb.convert("P")
  palette_t.info["transparency"] = 0
  return [
      rgb,
      Image.fromarray(rgba, "RGBA"),
      Image.fromarray(rgba[..., 0]),  # L
      Image.fromarray(rgba[..., :2], "LA"),
      rgb.convert("P"),
      palette_t,
      rgb.convert("CMYK"),
      Image.fromarray(rgba[..., 0]).convert("1"),
      Image.fromarray(rgba[..., 0].astype(np.uint16) * 200).convert("I;16"),
  ]


def _numpy_images(h, w, rng):
  rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
  return [rgba, rgba[..., :3], rgba[..., :1]]


@pytest.mark.parametrize("image_size", [224, 32])
def test_matches_clip_image_processor(image_size):
  rng = np.random.default_rng(image_size)
  hf = _hf(image_size)
  for h, w in SIZES:
    images = _pil_images(h, w, rng)
    if min(h, w) > 4:  # HF mis-reads the channel axis of tinier numpy arrays.
      images += _numpy_images(h, w, rng)
    got = ip.preprocess_images(images, image_size)
    assert got.shape == (len(images), image_size, image_size, 3)
    assert got.dtype == np.float32
    want = _hf_pixels(hf, images)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"{h}x{w}")


def test_resize_output_size_rule():
  assert ip.resize_output_size(480, 640, 224) == (224, 298)  # int(224 * 640 / 480) = 298
  assert ip.resize_output_size(640, 480, 224) == (298, 224)
  assert ip.resize_output_size(7, 300, 224) == (224, 9600)
  assert ip.resize_output_size(50, 50, 224) == (224, 224)


def test_black_image():
  black = ip.black_image(32)
  assert black.shape == (32, 32, 3) and black.dtype == np.float32
  zeros = ip.preprocess_images([np.zeros((40, 60, 3), np.uint8)], 32)[0]
  np.testing.assert_array_equal(black, zeros)
  np.testing.assert_allclose(black[0, 0], -np.array(ip.OPENAI_CLIP_MEAN) /
                             np.array(ip.OPENAI_CLIP_STD), rtol=1e-6)
  blank = ip.blank_pixel_values(3, 32)
  assert blank.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(blank, np.broadcast_to(black, blank.shape))
  assert ip.black_image().shape == (224, 224, 3)


def test_grayscale_2d_array_equals_l_image():
  gray = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
  np.testing.assert_array_equal(ip.preprocess_images([gray], 32),
                                ip.preprocess_images([Image.fromarray(gray)], 32))


def test_errors_name_the_index():
  good = np.zeros((10, 10, 3), np.uint8)
  with pytest.raises(ValueError, match="Empty"):
    ip.preprocess_images([])
  with pytest.raises(TypeError, match="image 1 "):
    ip.preprocess_images([good, "not an image"], 32)
  with pytest.raises(TypeError, match="image 2 .*float32"):
    ip.preprocess_images([good, good, good.astype(np.float32)], 32)
  with pytest.raises(ValueError, match="image 0 .*shape"):
    ip.preprocess_images([np.zeros((10, 10, 2), np.uint8)], 32)
  with pytest.raises(ValueError, match="image 0 .*empty"):
    ip.preprocess_images([np.zeros((0, 10, 3), np.uint8)], 32)
  with pytest.raises(TypeError, match="sequence"):
    ip.preprocess_images(Image.new("RGB", (4, 4)), 32)


def test_module_imports_without_torch_or_transformers():
  code = ("import sys, preflmr_jax.image_processing; "
          "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
