"""A checkpoint ready to generate and edit, and the files a sampling run writes.

``cfkit.load(CHECKPOINT)`` gives a ``Pipeline``: the network, its diffusion and prediction
target, and the checkpoint's image tokenizer when that maps images to the model's latents.
``generate``, ``edit`` and (text-conditioned checkpoints) ``text_to_image`` return images in
[-1, 1] ``(N, C, H, W)`` when there is such a tokenizer, else latents; ``caption`` returns
one caption per image. ``save_samples`` writes ``samples.npz`` (``latents``, ``labels``
and, when decoded, ``arr_0`` uint8 ``(N, H, W, C)``), one PNG per image and ``grid.png``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from cfkit import checkpoint
from cfkit.generate import Generated, GenerationError
from cfkit.generate import edit as edit_tokens
from cfkit.generate import generate as generate_tokens
from cfkit.generate import text_to_image as text_to_image_tokens
from cfkit.tokenizers import from_uint8, to_uint8


class Pipeline:
    """Generation with one checkpoint's method (see ``cfkit.generate`` for the options)."""

    def __init__(self, method):
        if not hasattr(method, "diffusion") or not hasattr(getattr(method.model, "config", None), "grid"):
            raise GenerationError(f"method {type(method).__name__} cannot be sampled: generation "
                                  "needs a diffusion network over a token grid")
        self.method = method
        self.model = method.model
        self.diffusion = method.diffusion
        self.experiment = method.experiment
        self.prediction = method.experiment.diffusion.prediction

    @classmethod
    def from_checkpoint(cls, directory, device="cpu") -> Pipeline:
        """The pipeline of a cfkit checkpoint folder (EMA weights when present)."""
        return cls(checkpoint.load(directory, device=device))

    @functools.cached_property
    def tokenizer(self):
        """The checkpoint's image tokenizer, or None when its latents are not the model's."""
        tokenizer = self.experiment.data.tokenizer.build()
        return tokenizer if tokenizer.channels == self.model.config.latent_channels else None

    @property
    def image_size(self) -> int | None:
        """Side of the images the tokenizer decodes the latents to (None without one)."""
        if self.tokenizer is None:
            return None
        return self.model.config.input_size * self.tokenizer.downsample

    def generate_latents(self, classes, *, seed: int = 0, **options) -> Generated:
        """Tokens and latents for ``classes`` (an int or one per image); ``options`` are those
        of ``cfkit.generate.generate`` (ar_steps, order, steps, cfg, cfg_interval, ...)."""
        generator = torch.Generator().manual_seed(seed)
        return generate_tokens(self.model, self.diffusion, classes, prediction=self.prediction,
                               generator=generator, **options)

    def generate(self, classes, *, seed: int = 0, **options) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in [-1, 1], or latents when there is no image tokenizer."""
        return self.decode(self.generate_latents(classes, seed=seed, **options).latents)

    def edit_latents(self, images: torch.Tensor, keep, classes, *, seed: int = 0,
                     **options) -> Generated:
        """Edit ``images`` (latents when there is no image tokenizer): keep the ``keep``
        tokens and generate the others for ``classes``; ``options`` as ``edit``'s."""
        generator = torch.Generator().manual_seed(seed)
        return edit_tokens(self.model, self.diffusion, self.encode(images), keep, classes,
                           prediction=self.prediction, generator=generator, **options)

    def edit(self, images: torch.Tensor, keep, classes, *, seed: int = 0, **options) -> torch.Tensor:
        return self.decode(self.edit_latents(images, keep, classes, seed=seed, **options).latents)

    @property
    def text_conditioned(self) -> bool:
        """Whether the checkpoint's method has text (``text_to_image`` and ``caption``)."""
        return hasattr(self.method, "frame")

    def _text_method(self):
        if not self.text_conditioned:
            raise GenerationError(f"method {self.experiment.method.name!r} has no text: "
                                  "text-to-image and captioning need a multimodal checkpoint")
        return self.method

    def text_to_image_latents(self, prompts, *, seed: int = 0, **options) -> Generated:
        """Tokens and latents of one image per caption of ``prompts`` (a string or a list);
        ``options`` are those of ``cfkit.generate.text_to_image`` (ar_steps, cfg, ...)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text = self._text_method().frame(prompts).to(self.model.pos_embed.device)
        generator = torch.Generator().manual_seed(seed)
        return text_to_image_tokens(self.model, self.diffusion, text, prediction=self.prediction,
                                    generator=generator, **options)

    def text_to_image(self, prompts, *, seed: int = 0, **options) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in [-1, 1] (or latents) for the captions ``prompts``."""
        return self.decode(self.text_to_image_latents(prompts, seed=seed, **options).latents)

    def caption(self, images: torch.Tensor, *, seed: int = 0, **decoding) -> list[str]:
        """One caption per image of ``images`` (latents when there is no image tokenizer);
        greedy, or ``top_k`` / ``top_p`` sampling, or ``beams`` (``cfkit.captioning``)."""
        method = self._text_method()
        generator = torch.Generator().manual_seed(seed)
        return method.caption(self.encode(images), generator=generator, **decoding)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents if self.tokenizer is None else self.tokenizer.decode(latents)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is None:
            return images
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.tokenizer.channels, size, size):
            raise GenerationError(f"images must be (N, {self.tokenizer.channels}, {size}, {size}) "
                                  f"for this checkpoint, got {tuple(images.shape)}")
        return self.tokenizer.encode(images.to(self.model.patch_embed.weight))


def read_image(path, channels: int) -> torch.Tensor:
    """A PNG (or any Pillow image) as ``(1, channels, H, W)`` in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image.convert("L" if channels == 1 else "RGB"))
    except UnidentifiedImageError:
        raise GenerationError(f"{path}: not an image Pillow can read") from None
    return from_uint8(array.reshape(1, *array.shape[:2], channels))


def image_grid(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` -> one ``(rows*H, cols*W, C)`` image, ceil(sqrt(N)) columns."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = np.zeros((rows * cols, h, w, c), dtype=images.dtype)
    padded[:n] = images
    return padded.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(path: Path, image: np.ndarray) -> None:
    """uint8 ``(H, W, 1|3)`` -> PNG, written to a temporary name and renamed."""
    from PIL import Image

    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    checkpoint.atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_samples(out, latents: torch.Tensor, labels: torch.Tensor,
                 images: torch.Tensor | None = None, prompts: list[str] | None = None) -> list[Path]:
    """Write ``samples.npz`` and, with ``images`` in [-1, 1], ``{i:06d}.png`` and ``grid.png``
    to the folder ``out``; returns the paths written. Text-to-image samples also store their
    ``prompts``."""
    out = Path(out)
    arrays = {"latents": latents.float().cpu().numpy(), "labels": labels.cpu().numpy()}
    if prompts is not None:
        arrays["prompts"] = np.array(prompts, dtype=str)
    if images is not None:
        arrays["arr_0"] = to_uint8(images)

    def write_npz(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    written = [out / "samples.npz"]
    checkpoint.atomic_write(written[0], write_npz)
    if images is not None:
        for i, image in enumerate(arrays["arr_0"]):
            written.append(out / f"{i:06d}.png")
            save_png(written[-1], image)
        written.append(out / "grid.png")
        save_png(written[-1], image_grid(arrays["arr_0"]))
    return written
