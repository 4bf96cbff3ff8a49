"""Autoencoders behind one interface: diffusers' SD AutoencoderKL, or identity for pixel-space models."""
from __future__ import annotations

from pathlib import Path

import torch

SD_LATENT_SCALE = 0.18215


class PixelVAE:
    """Identity autoencoder: the DiT works directly on pixels in [-1, 1]."""

    kind = "pixel"
    latent_scale = 1.0
    downscale = 1

    def __init__(self, channels: int = 1):
        self.channels = channels

    def to(self, device=None, dtype=None):
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images  # (B, C, H, W)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # (B, C, H, W)


class SDVAE:
    """Stable Diffusion's AutoencoderKL (diffusers); latents scaled by its config's scaling_factor (0.18215 in DiT)."""

    kind = "sd"

    def __init__(self, autoencoder, latent_scale: float | None = None):
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        cfg = autoencoder.config
        self.channels = cfg.latent_channels
        self.latent_scale = latent_scale or getattr(cfg, "scaling_factor", None) or SD_LATENT_SCALE
        self.downscale = 2 ** (len(cfg.block_out_channels) - 1)  # pixels per latent cell along each side

    @classmethod
    def from_pretrained(cls, path: str | Path, latent_scale: float | None = None) -> SDVAE:
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL.from_pretrained(str(path)), latent_scale)

    @classmethod
    def random_sd(cls, **overrides) -> SDVAE:
        """The SD VAE architecture (sd-vae-ft-mse config) with random weights: plumbing tests only."""
        from diffusers import AutoencoderKL

        cfg = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2,
                   block_out_channels=(128, 256, 512, 512),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        return cls(AutoencoderKL(**(cfg | overrides)))

    def to(self, device=None, dtype=None):
        self.autoencoder.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.autoencoder.encode(images.to(self.autoencoder.dtype)).latent_dist
        return dist.mean * self.latent_scale  # (B, 4, H/8, W/8)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents.to(self.autoencoder.dtype) / self.latent_scale).sample.float()


def vae_downscale(spec: str) -> int:
    """Pixels per latent cell along a side, from an AutoencoderKL folder's (or Hub id's) config alone."""
    from diffusers import AutoencoderKL

    return 2 ** (len(AutoencoderKL.load_config(str(spec))["block_out_channels"]) - 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
