"""KL-autoencoder image tokenizers: mar-vae (MAR's KL-16, the LDM architecture, from its ``.ckpt``)
and sd-vae (a local diffusers ``AutoencoderKL`` folder).

Both encode images in [-1, 1] to ``scale * (posterior mean - shift)`` (a posterior sample when a
generator is given) and decode latents by undoing the scaling and running the decoder.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cfkit import hookimpl
from cfkit.convert import CheckpointError

MAR_SCALE = 0.2325  # MAR's latent scale for its KL-16 VAE


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm over 32 groups, as every LDM autoencoder normalises."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two GroupNorm-swish-conv3x3 layers plus a residual (a 1x1 ``nin_shortcut`` when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, Cin, H, W)`` -> ``(N, Cout, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv q, k, v and output projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)``."""
        n, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (N, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 conv3x3 after padding one pixel right and bottom only (LDM's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H/2, W/2)``."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, 2H, 2W)``."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, each followed by attention when
    the level attends, then an optional down- or upsampling."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attend: bool,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks) if attend)
        self.downsample = Downsample(out_channels) if downsample else None
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, Cin, H, W)`` -> ``(N, Cout, H', W')`` with H' = H/2, 2H or H."""
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)``."""
        return self.block_2(self.attn_1(self.block_1(x)))


@dataclass(frozen=True)
class VAEConfig:
    """The LDM KL-autoencoder architecture; MAR's KL-16 by default.

    Attention sits at the levels whose *structural* resolution (``structural_resolution``
    halved once per level) is listed, whatever size the images actually are: a model built for
    256 px with attention at 16 attends at its last level on 64 px inputs too.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    embed_dim: int = 16
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    structural_resolution: int = 256
    image_channels: int = 3

    def __post_init__(self):
        resolutions = self.level_resolutions()
        for field in ("encoder_attn_resolutions", "decoder_attn_resolutions"):
            unknown = sorted(set(getattr(self, field)) - set(resolutions))
            if unknown:
                raise ValueError(f"{field} {unknown} are not level resolutions of structural_resolution "
                                 f"{self.structural_resolution}: {resolutions}")
        if self.ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm groups), got {self.ch}")

    def level_resolutions(self) -> list[int]:
        return [self.structural_resolution // 2**i for i in range(len(self.ch_mult))]

    def attends(self, level: int, resolutions: tuple[int, ...]) -> bool:
        return self.level_resolutions()[level] in resolutions

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Encoder(nn.Module):
    """Images ``(N, 3, H, W)`` -> moments ``(N, 2 * embed_dim, H/f, W/f)`` (mean and log-variance)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in (1, *config.ch_mult)]
        last = len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.image_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[i], widths[i + 1], config.num_res_blocks,
                  config.attends(i, config.encoder_attn_resolutions), downsample=i < last)
            for i in range(last + 1)
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = normalize(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    """Latents ``(N, embed_dim, h, w)`` -> images ``(N, 3, h*f, w*f)``; levels run deepest first."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        outs = [config.ch * m for m in config.ch_mult]
        ins = outs[1:] + outs[-1:]  # level i takes the width of level i+1 (the deepest keeps its own)
        self.conv_in = nn.Conv2d(config.embed_dim, outs[-1], 3, padding=1)
        self.mid = MidBlock(outs[-1])
        self.up = nn.ModuleList(
            Level(ins[i], outs[i], config.num_res_blocks + 1,
                  config.attends(i, config.decoder_attn_resolutions), upsample=i > 0)
            for i in range(len(outs))
        )
        self.norm_out = normalize(outs[0])
        self.conv_out = nn.Conv2d(outs[0], config.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class KLAutoencoder(nn.Module):
    """The LDM/MAR ``AutoencoderKL``: encoder + ``quant_conv`` to a diagonal Gaussian posterior,
    ``post_quant_conv`` + decoder back to images (all unscaled). Its weights always come from a
    checkpoint (``load_mar_vae``); PyTorch's default initialisation only serves tests."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.embed_dim, 1)

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 3, H, W)`` -> posterior mean and std, each ``(N, embed_dim, H/f, W/f)``."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # LDM's clamp, kept for parity

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``(N, embed_dim, h, w)`` -> images ``(N, 3, h*f, w*f)`` (not clamped)."""
        return self.decoder(self.post_quant_conv(z))


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """The state dict of a MAR ``.ckpt`` (``{"model": state_dict}``), unpickling tensors only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VAE checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused: it carries a pickled object other than tensors "
                              f"({str(error).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path}: expected a dict {{'model': state_dict}} as MAR ships its VAE")
    return checkpoint["model"]


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` (same key names); any missing, unexpected or mis-shaped key
    is an error listing all of them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                       if k in state and state[k].shape != v.shape)
    problems = [f"{what}: {', '.join(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped))
                if keys]
    if problems:
        raise CheckpointError(f"{source} does not match the VAE architecture: " + "; ".join(problems))
    model.load_state_dict(state)


def load_mar_vae(path, config: VAEConfig) -> KLAutoencoder:
    """A ``KLAutoencoder`` of ``config`` with the weights of the MAR checkpoint at ``path``."""
    model = KLAutoencoder(config)
    load_state(model, read_state_dict(path), str(path))
    return model.eval()


class DiffusersKL(nn.Module):
    """A diffusers ``AutoencoderKL`` seen through ``KLAutoencoder``'s ``posterior`` / ``decode``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distribution = self.vae.encode(images).latent_dist
        return distribution.mean, distribution.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


class ScaledVAE:
    """An image tokenizer over a KL autoencoder: latents are ``scale * (z - shift)``. The model
    runs in float32 on the device of the tensors it is given (moved there on first use)."""

    def __init__(self, model: nn.Module, channels: int, downsample: int, scale: float, shift: float = 0.0):
        self.model = model.eval().requires_grad_(False)
        self.channels, self.downsample = channels, downsample
        self.scale, self.shift = float(scale), float(shift)

    def _follow(self, x: torch.Tensor) -> torch.Tensor:
        self.model.to(x.device)
        return x.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(N, 3|1, H, W)`` in [-1, 1] -> latents ``(N, channels, H/f, W/f)``; grey images
        are repeated to 3 channels."""
        if images.shape[-1] % self.downsample or images.shape[-2] % self.downsample:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.downsample}")
        x = self._follow(images)
        mean, std = self.model.posterior(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device)
            mean = mean + std * noise.to(mean.device)
        return (mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, channels, h, w)`` -> images ``(N, 3, h*f, w*f)`` clamped to [-1, 1]."""
        z = self._follow(latents) / self.scale + self.shift
        return self.model.decode(z).clamp(-1, 1)


def mar_vae(path: str, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
            embed_dim: int = 16, encoder_attn_resolutions: tuple[int, ...] = (16,),
            decoder_attn_resolutions: tuple[int, ...] = (), structural_resolution: int = 256,
            scale: float = MAR_SCALE) -> ScaledVAE:
    """MAR's KL-16 VAE (16 channels per 16x16 pixels) from its ``.ckpt``."""
    config = VAEConfig(ch, tuple(ch_mult), num_res_blocks, embed_dim, tuple(encoder_attn_resolutions),
                       tuple(decoder_attn_resolutions), structural_resolution)
    return ScaledVAE(load_mar_vae(path, config), embed_dim, config.downsample, scale)


def sd_vae(path: str, scale: float | None = None) -> ScaledVAE:
    """A diffusers ``AutoencoderKL`` saved in the local folder ``path`` (never downloaded); the
    scale and shift are the folder's ``scaling_factor`` (0.18215 for Stable Diffusion's VAE) and
    ``shift_factor`` unless ``scale`` is given."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"sd-vae: no such folder: {folder} (give a local diffusers AutoencoderKL "
                              "folder, e.g. written by save_pretrained)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"sd-vae: {folder} has no config.json; expected a diffusers AutoencoderKL "
                              "folder (written by save_pretrained)")
    from diffusers import AutoencoderKL  # imports slowly; only this tokenizer needs it

    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"sd-vae: cannot load {folder}: {error}") from None
    config = vae.config
    return ScaledVAE(DiffusersKL(vae), config.latent_channels, 2 ** (len(config.block_out_channels) - 1),
                     config.scaling_factor if scale is None else scale, config.shift_factor or 0.0)


# A config naming weights is checked by its options only: the weights may live elsewhere.
mar_vae.reads_files = sd_vae.reads_files = True


@hookimpl
def register_image_tokenizers(register):
    register("mar-vae", mar_vae)
    register("sd-vae", sd_vae)
