"""Built-in image tokenizers: pixels (identity with scaling)."""

from __future__ import annotations

from cfkit import hookimpl


class Pixels:
    """Pixels as latents: ``latent = scale * image``; no downsampling (the embedded default)."""

    downsample = 1

    def __init__(self, channels: int = 1, scale: float = 1.0):
        if channels not in (1, 3):
            raise ValueError(f"pixels: channels must be 1 or 3, got {channels}")
        if scale <= 0:
            raise ValueError(f"pixels: scale must be > 0, got {scale}")
        self.channels, self.scale = channels, float(scale)

    def encode(self, images, generator=None):
        return images * self.scale

    def decode(self, latents):
        return (latents / self.scale).clamp(-1, 1)


@hookimpl
def register_image_tokenizers(register):
    register("pixels", Pixels)


@hookimpl
def register_defaults(register):
    """Images are their own tokens unless a config names a tokenizer."""
    register("data.tokenizer", "pixels")
