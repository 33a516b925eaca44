"""Image processor of UoE vision models: (grey/RGB conversion,) resize, rescale, normalize -> `pixel_values`.

Built on transformers' PIL/NumPy backend (no torchvision needed). Grey images become RGB when the model
expects 3 channels (`do_convert_rgb=True`, the default); with `do_convert_grayscale=True` every image is
reduced to one luminance channel instead, for models with `num_channels=1`.
"""

from __future__ import annotations

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ImageInput, PILImageResampling, is_pil_image
from transformers.processing_utils import ImagesKwargs

# ITU-R 601-2 luma, the weights PIL's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class UoEImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_convert_grayscale (`bool`, *optional*, defaults to `False`):
        Reduce every image to one luminance channel (for models with `num_channels=1`). Takes precedence over
        `do_convert_rgb`.
    """

    do_convert_grayscale: bool


class UoEImageProcessor(PilBackend):
    r"""Resize to `size`, rescale by `rescale_factor` (1/255) and normalise with `image_mean` / `image_std`.

    Example for Fashion-MNIST-sized grey inputs to a one-channel model:
    `UoEImageProcessor(size={"height": 28, "width": 28}, do_convert_grayscale=True, image_mean=[0.286],
    image_std=[0.353])`.
    """

    valid_kwargs = UoEImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_convert_grayscale = False

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        # transformers only accepts 3-D arrays; a 2-D (height, width) array or tensor is a grey image.
        def add_channel(image):
            return image[..., None] if hasattr(image, "ndim") and not is_pil_image(image) and image.ndim == 2 else image

        if isinstance(images, (list, tuple)):
            images = [add_channel(image) for image in images]
        else:
            images = add_channel(images)
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        do_convert_grayscale: bool | None = None,
        input_data_format=None,
        **kwargs,
    ) -> np.ndarray:
        grayscale = bool(do_convert_grayscale)
        image = super().process_image(
            image, do_convert_rgb=bool(do_convert_rgb) and not grayscale, input_data_format=input_data_format
        )
        channels = image.shape[0]
        if grayscale and channels in (3, 4):
            # drop alpha, then weight R, G, B; keep the input dtype range (rescaling comes later)
            grey = np.tensordot(_LUMA, image[:3].astype(np.float32), axes=1)[None]
            # back to the input dtype so that resizing (through PIL) sees the same value range
            image = np.clip(np.rint(grey), 0, 255).astype(image.dtype) if image.dtype == np.uint8 else grey
        elif not grayscale and do_convert_rgb and channels == 1:
            image = np.repeat(image, 3, axis=0)  # grey NumPy/tensor input: same value in R, G and B
        return image


__all__ = ["UoEImageProcessor"]
