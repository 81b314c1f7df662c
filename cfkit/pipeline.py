"""A checkpoint ready to generate and edit, and the files a sampling run writes.

``cfkit.load(CHECKPOINT)`` gives a ``Pipeline``: the network, its diffusion and prediction
target, and the checkpoint's image tokenizer when that maps images to the model's latents.
``generate``, ``edit`` and (text-conditioned checkpoints) ``text_to_image`` return float
images in [-1, 1] ``(N, C, H, W)`` when there is such a tokenizer, else latents; ``to_pil``
turns the images into PIL images; ``caption`` returns one caption per image. Image i of a call
is drawn from generators seeded by ``(seed, i)`` (``cfkit.samplers.SampleGenerators``), and
``sample_set`` draws image i of a set of any size the same way, batch by batch and, under
torchrun, split across the processes: a set does not depend on the batch size or the number of
processes. ``save_samples`` writes ``samples.npz`` (``latents``, ``labels`` and, when decoded,
``arr_0`` uint8 ``(N, H, W, C)``), one PNG per image and ``grid.png`` (upscaled tiles, grey gaps).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cfkit import checkpoint
from cfkit.generate import Generated, GenerationError, SamplingOptions
from cfkit.generate import edit as edit_tokens
from cfkit.generate import generate as generate_tokens
from cfkit.generate import text_to_image as text_to_image_tokens
from cfkit.methods import SAMPLING, TEXT_CONDITIONING, can
from cfkit.samplers import SampleGenerators
from cfkit.tokenizers import from_uint8, to_uint8


class Pipeline:
    """Generation with one checkpoint's method (see ``cfkit.generate`` for the options)."""

    def __init__(self, method):
        if not can(method, SAMPLING):
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

    def generate_latents(self, classes, options: SamplingOptions | None = None, *, progress=None,
                         generator=None, **fields) -> Generated:
        """Tokens and latents for ``classes`` (an int or one per image) with the
        ``SamplingOptions`` ``options`` (or its fields as keywords: ar_steps, order, steps,
        cfg, cfg_interval, seed, ...); ``generator`` (default: image i's seeded by
        ``(seed, i)``) draws the orders and noise."""
        options = SamplingOptions.of(options, **fields)
        generator = _per_image(options, torch.as_tensor(classes).numel()) if generator is None else generator
        return generate_tokens(self.model, self.diffusion, classes, options, prediction=self.prediction,
                               generator=generator, progress=progress)

    def generate(self, classes, options: SamplingOptions | None = None, *, progress=None,
                 **fields) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in [-1, 1], or latents when there is no image tokenizer."""
        return self.decode(self.generate_latents(classes, options, progress=progress, **fields).latents)

    def edit_latents(self, images: torch.Tensor, keep, classes, options: SamplingOptions | None = None,
                     *, progress=None, generator=None, **fields) -> Generated:
        """Edit ``images`` (latents when there is no image tokenizer): keep the ``keep``
        tokens and generate the others for ``classes``; options as ``generate_latents``'."""
        options = SamplingOptions.of(options, **fields)
        generator = _per_image(options, len(images)) if generator is None else generator
        return edit_tokens(self.model, self.diffusion, self.encode(images), keep, classes, options,
                           prediction=self.prediction, generator=generator, progress=progress)

    def edit(self, images: torch.Tensor, keep, classes, options: SamplingOptions | None = None, *,
             progress=None, **fields) -> torch.Tensor:
        return self.decode(self.edit_latents(images, keep, classes, options, progress=progress,
                                             **fields).latents)

    @property
    def text_conditioned(self) -> bool:
        """Whether the checkpoint's method has text (``text_to_image`` and ``caption``)."""
        return can(self.method, TEXT_CONDITIONING)

    def _text_method(self):
        if not self.text_conditioned:
            raise GenerationError(f"method {self.experiment.method.name!r} has no text: "
                                  "text-to-image and captioning need a multimodal checkpoint")
        return self.method

    def text_to_image_latents(self, prompts, options: SamplingOptions | None = None, *,
                              progress=None, generator=None, **fields) -> Generated:
        """Tokens and latents of one image per caption of ``prompts`` (a string or a list);
        options as ``generate_latents``'."""
        options = SamplingOptions.of(options, **fields)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        text = self._text_method().frame(prompts).to(self.model.pos_embed.device)
        generator = _per_image(options, len(prompts)) if generator is None else generator
        return text_to_image_tokens(self.model, self.diffusion, text, options, prediction=self.prediction,
                                    generator=generator, progress=progress)

    def text_to_image(self, prompts, options: SamplingOptions | None = None, *, progress=None,
                      **fields) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in [-1, 1] (or latents) for the captions ``prompts``."""
        return self.decode(self.text_to_image_latents(prompts, options, progress=progress, **fields).latents)

    def write_samples(self, out, options: SamplingOptions | None = None, *, classes=None,
                      prompts: list[str] | None = None, group=None, progress=None,
                      **fields) -> list[Path]:
        """Generate one image per class of ``classes`` (or caption of ``prompts``) by
        ``sample_set`` and write each batch into the folder ``out`` as it comes
        (``SampleWriter``; rank 0 of a process ``group`` alone writes); returns the paths
        written."""
        options = SamplingOptions.of(options, **fields)
        labels = torch.full((len(prompts),), -1) if prompts is not None else torch.as_tensor(classes)
        main = group is None or group.is_main
        writer = SampleWriter(out, labels.reshape(-1), prompts) if main else None
        with writer or contextlib.nullcontext():
            for latents, images in self.sample_set(options, classes=classes, prompts=prompts,
                                                   group=group, progress=progress):
                writer.add(latents, images)  # sample_set gives batches to rank 0 alone
        return [] if writer is None else writer.written

    def sample_set(self, options: SamplingOptions | None = None, *, classes=None,
                   prompts: list[str] | None = None, group=None, progress=None,
                   **fields) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One image per class of ``classes`` (or caption of ``prompts``), in order, as
        batches ``(latents, images)``: latents ``(n, C, h, w)`` float32 and uint8 images
        ``(n, H, W, C)`` (None without an image tokenizer), on the CPU. Image i is drawn from
        generators seeded by ``(options.seed, i)``, ``options.batch_size`` images at a time.
        Under a process ``group`` (``cfkit.distributed.Distributed``) of W processes, process
        r generates batches r, r + W, ... and each round of W batches is gathered to rank 0,
        which alone gets them: the set of one process. ``progress(done, total)`` counts this
        process's diffusion steps."""
        options = SamplingOptions.of(options, **fields)
        condition = list(prompts) if prompts is not None else torch.as_tensor(classes).reshape(-1)
        rank, size = (0, 1) if group is None else (group.rank, group.world_size)
        batch_size = options.batch_size
        rounds = math.ceil(math.ceil(len(condition) / batch_size) / size)
        for r in range(rounds):
            start = (r * size + rank) * batch_size
            rows = range(min(start, len(condition)), min(start + batch_size, len(condition)))
            done = None if progress is None else functools.partial(_of_batches, progress, r, rounds)
            latents, images = self._sample_rows(condition, rows, prompts is not None, options, done)
            if group is not None:
                latents, images = group.gather(latents), images if images is None else group.gather(images)
            if latents is not None:
                yield latents, images

    def _sample_rows(self, condition, rows: range, text: bool, options: SamplingOptions,
                     progress) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents and uint8 images of the samples ``rows`` of a set (none past its end)."""
        config, decodes = self.model.config, self.tokenizer is not None
        if not rows:  # a process past the last batch still takes part in the gather
            latents = torch.empty(0, config.latent_channels, config.input_size, config.input_size)
            if not decodes:
                return latents, None
            side = self.image_size
            return latents, torch.empty(0, side, side, self.tokenizer.channels, dtype=torch.uint8)
        chunk = condition[rows.start:rows.stop]
        generator = SampleGenerators(options.seed, rows)
        sample = self.text_to_image_latents if text else self.generate_latents
        latents = sample(chunk, options, progress=progress, generator=generator).latents
        images = torch.from_numpy(to_uint8(self.decode(latents))) if decodes else None
        return latents.float(), images

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
        self._check_images(images)
        return self.tokenizer.encode(images.to(self.model.patch_embed.weight))

    def to_pil(self, images: torch.Tensor) -> list:
        """``generate``'s (``edit``'s, ``text_to_image``'s) images ``(N, C, H, W)`` in [-1, 1] as
        N PIL images (mode L for 1 channel, RGB for 3), to ``.save("x.png")`` or show."""
        if self.tokenizer is None:
            raise GenerationError("this checkpoint's image tokenizer does not decode its latents: "
                                  "generate returns latents, not images")
        self._check_images(images)
        return [pil_image(image) for image in to_uint8(images)]

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (self.tokenizer.channels, size, size):
            raise GenerationError(f"images must be (N, {self.tokenizer.channels}, {size}, {size}) "
                                  f"for this checkpoint, got {tuple(images.shape)}")


def _per_image(options: SamplingOptions, num: int) -> SampleGenerators:
    """The generators of a call's ``num`` images: image i's seeded by ``(options.seed, i)``."""
    return SampleGenerators(options.seed, range(num))


def _of_batches(progress, batch: int, batches: int, done: int, total: int) -> None:
    """One batch's ``progress(done, total)`` as progress over all ``batches`` of its size."""
    progress(batch * total + done, batches * total)


def read_image(path, channels: int) -> torch.Tensor:
    """A PNG (or any Pillow image) as ``(1, channels, H, W)`` in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image.convert("L" if channels == 1 else "RGB"))
    except UnidentifiedImageError:
        raise GenerationError(f"{path}: not an image Pillow can read") from None
    return from_uint8(array.reshape(1, *array.shape[:2], channels))


GRID_TILE = 64  # grid.png shows an image at least this many pixels wide: 8x8 digits are legible


def compose(rows: list[list[np.ndarray]], pad: int = 1) -> np.ndarray:
    """uint8 images ``(H, W, C)`` in rows -> one ``(R*(H+2p), K*(W+2p), C)`` array, each image
    framed by ``pad`` grey pixels (so neighbours stay apart), empty cells grey."""
    h, w, c = rows[0][0].shape
    width = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + 2 * pad), width * (w + 2 * pad), c), 96, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = i * (h + 2 * pad) + pad, j * (w + 2 * pad) + pad
            grid[top:top + h, left:left + w] = image
    return grid


def image_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 ``(N, H, W, C)`` -> one image of ceil(sqrt(N)) columns: each image upscaled
    (nearest) ``s = ceil(GRID_TILE / max(H, W))`` times and ``compose``d with ``pad``-pixel
    frames, ``(rows*(s*H+2*pad), cols*(s*W+2*pad), C)``."""
    n, h, w, _ = images.shape
    scale = max(1, math.ceil(GRID_TILE / max(h, w)))
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)
    cols = math.ceil(math.sqrt(n))
    return compose([list(tiles[i:i + cols]) for i in range(0, n, cols)], pad)


def pil_image(image: np.ndarray):
    """uint8 ``(H, W, 1|3)`` -> a PIL image of mode L or RGB."""
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_png(path: Path, image: np.ndarray) -> None:
    """uint8 ``(H, W, 1|3)`` -> PNG, written to a temporary name and renamed."""
    picture = pil_image(image)
    checkpoint.atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_samples(out, latents: torch.Tensor, labels: torch.Tensor,
                 images: torch.Tensor | None = None, prompts: list[str] | None = None) -> list[Path]:
    """Write ``samples.npz`` and, with ``images`` in [-1, 1], ``{i:06d}.png`` and ``grid.png``
    to the folder ``out``; returns the paths written. Text-to-image samples also store their
    ``prompts``."""
    with SampleWriter(out, labels, prompts) as writer:
        writer.add(latents, None if images is None else to_uint8(images))
    return writer.written


class SampleWriter:
    """A sample set written batch by batch, so that memory holds one batch whatever its size:
    ``add`` writes each image's PNG and appends the batch to temporary ``.npy`` files (in a
    hidden folder in ``out``), ``close`` assembles them into ``samples.npz`` (a temp file
    renamed) and draws ``grid.png`` of the first ``GRID_IMAGES`` images. ``labels`` ``(N,)``
    and ``prompts`` are known up front; ``out`` is created by the first batch."""

    GRID_IMAGES = 256

    def __init__(self, out, labels: torch.Tensor, prompts: list[str] | None = None):
        self.out, self.labels, self.prompts = Path(out), labels.cpu().numpy(), prompts
        self.count, self.arrays, self.grid, self.written = 0, {}, [], []
        self.staging: Path | None = None

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.close()
        finally:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            for handle in self.arrays.values():
                handle.close()

    def add(self, latents: torch.Tensor, images: torch.Tensor | np.ndarray | None = None) -> None:
        """The next ``n`` samples: latents ``(n, C, h, w)`` and uint8 images ``(n, H, W, C)``
        (None when the checkpoint's tokenizer does not decode)."""
        batch = {"latents": latents.float().cpu().numpy()}
        if images is not None:
            batch["arr_0"] = np.asarray(images)
            for i, image in enumerate(batch["arr_0"], self.count):
                self.written.append(self.out / f"{i:06d}.png")
                save_png(self.written[-1], image)
            self.grid.extend(batch["arr_0"][: self.GRID_IMAGES - len(self.grid)])
        for name, array in batch.items():
            self._array(name, array).write(np.ascontiguousarray(array).tobytes())
        self.count += len(latents)

    def _array(self, name: str, batch: np.ndarray):
        """The open ``.npy`` file of ``name``, its header written for all N rows."""
        if name not in self.arrays:
            self.arrays[name] = open(self._staged(f"{name}.npy"), "wb")  # closed by close or exit
            header = {"descr": np.lib.format.dtype_to_descr(batch.dtype), "fortran_order": False,
                      "shape": (len(self.labels), *batch.shape[1:])}
            np.lib.format.write_array_header_1_0(self.arrays[name], header)
        return self.arrays[name]

    def _staged(self, name: str) -> Path:
        """``name`` in the staging folder, made (with ``out``) on first use."""
        if self.staging is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=".samples-", dir=self.out))
        return self.staging / name

    def close(self) -> None:
        """Write ``samples.npz`` (``latents``, ``labels``, ``arr_0``, ``prompts``) and ``grid.png``."""
        if self.count != len(self.labels):
            raise ValueError(f"{self.count} samples written for {len(self.labels)} labels")
        for handle in self.arrays.values():
            handle.close()
        np.save(self._staged("labels.npy"), self.labels)
        if self.prompts is not None:
            np.save(self._staged("prompts.npy"), np.array(self.prompts, dtype=str))

        def write_npz(tmp):  # np.savez's layout, each member copied from its file in chunks
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for path in sorted(self.staging.glob("*.npy")):
                    archive.write(path, path.name)

        self.written.insert(0, self.out / "samples.npz")
        checkpoint.atomic_write(self.written[0], write_npz)
        if self.grid:
            self.written.append(self.out / "grid.png")
            save_png(self.written[-1], image_grid(np.stack(self.grid)))
