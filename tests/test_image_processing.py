"""UoEImageProcessor: grey / RGB conversion, resize, rescale and normalise against NumPy / PIL references,
and the save / AutoImageProcessor round trip."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

from uoe import UoEImageProcessor


def test_grey_to_rgb_rescale_normalize_matches_numpy():
    processor = UoEImageProcessor(
        size={"height": 6, "width": 6}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.5]
    )
    grey = np.random.default_rng(0).integers(0, 256, (6, 6), dtype=np.uint8)
    out = processor(grey, return_tensors="np")["pixel_values"]
    assert out.shape == (1, 3, 6, 6)
    # same size: resizing is the identity; then x / 255, then (x - mean) / std per channel
    expected = (np.repeat(grey[None], 3, 0) / 255.0 - np.array([0.5, 0.4, 0.3])[:, None, None]) / np.array(
        [0.2, 0.25, 0.5]
    )[:, None, None]
    np.testing.assert_allclose(out[0], expected, atol=1e-5)
    # a 2-D torch tensor and a PIL "L" image are grey images too
    np.testing.assert_allclose(processor(torch.from_numpy(grey), return_tensors="np")["pixel_values"], out, atol=1e-6)
    np.testing.assert_allclose(
        processor(PIL.Image.fromarray(grey), return_tensors="np")["pixel_values"], out, atol=1e-6
    )


def test_rgb_to_grey_and_resize_match_pil():
    processor = UoEImageProcessor(
        size={"height": 8, "width": 8},
        do_convert_grayscale=True,
        do_convert_rgb=False,
        do_normalize=False,
        do_rescale=False,
    )
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = processor([rgb, rgb], return_tensors="np")["pixel_values"]
    assert out.shape == (2, 1, 8, 8)
    expected = np.asarray(PIL.Image.fromarray(rgb).convert("L").resize((8, 8), PIL.Image.BILINEAR), dtype=np.float32)
    # PIL's own "L" conversion rounds slightly differently from the luma weights: allow one grey level
    np.testing.assert_allclose(out[0, 0], expected, atol=1.01)


def test_rgb_stays_rgb_channels_first():
    processor = UoEImageProcessor(size={"height": 6, "width": 5}, do_normalize=False)
    rgb = np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    out = processor(rgb, return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 6, 5)
    torch.testing.assert_close(out[0], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)


def test_round_trip(tmp_path):
    processor = UoEImageProcessor(
        size={"height": 5, "width": 5}, do_convert_grayscale=True, image_mean=[0.3], image_std=[0.4]
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is UoEImageProcessor
    assert loaded.do_convert_grayscale and loaded.size.height == 5 and list(loaded.image_mean) == [0.3]
    image = np.random.default_rng(3).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        loaded(image, return_tensors="np")["pixel_values"], processor(image, return_tensors="np")["pixel_values"]
    )


def test_unknown_input_raises():
    with pytest.raises(ValueError):
        UoEImageProcessor()("not an image")
