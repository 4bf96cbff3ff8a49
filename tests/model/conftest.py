import pytest
import torch

from app.model import DiT_models
from app.model.dit import DiT, DiTConfig


def tiny_config(**overrides) -> DiTConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4, num_classes=10)
    return DiTConfig(**(base | overrides))


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random weights everywhere (adaLN-Zero init would make every block an identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture
def tiny_class():
    return randomize(DiT(tiny_config()))


@pytest.fixture
def tiny_text():
    return randomize(DiT(tiny_config(num_classes=0, text_dim=16)))


@pytest.fixture
def tiny_uncond():
    return randomize(DiT(tiny_config(num_classes=0)))


__all__ = ["tiny_config", "randomize", "DiT_models"]
