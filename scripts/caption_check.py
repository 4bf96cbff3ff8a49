"""Per-digit caption following of a text base: "a zero" ... "a nine", 20 seeds each, judged by the project's
digit classifier (the one `python -m app.trainer eval` uses for mnist-captions).

    python scripts/caption_check.py models/mnist-captions.safetensors [patches/mnist-captions-dmp.safetensors]
        [--guidance 4] [--seeds 20]
"""
from __future__ import annotations

import argparse

import torch

from app.model import generate, load_base
from app.model.dmp import load_patch
from app.model.text import load_text_encoder
from app.trainer.captions import DIGIT_WORDS
from app.trainer.evaluate import Evaluator


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("patch", nargs="?")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    base = load_base(args.base)
    patch = load_patch(args.patch, base=base) if args.patch else None
    encoder = load_text_encoder(base.meta.get("text_encoder") or "minilm")
    clf = Evaluator("mnist-captions", base.config.input_size, progress=False).clf
    hits = []
    for digit, word in enumerate(DIGIT_WORDS):
        img = generate(base, captions=f"a {word}", text_encoder=encoder, patch=patch, sampler="ddim", steps=50,
                       guidance_scale=args.guidance, seeds=list(range(args.seeds)))  # (S, H, W, C) uint8
        x = img.permute(0, 3, 1, 2).float() / 127.5 - 1
        hits.append((clf(x).argmax(-1) == digit).float().mean().item())
    print(" ".join(f"{w}:{h:.2f}" for w, h in zip(DIGIT_WORDS, hits, strict=True)), f"mean {sum(hits) / len(hits):.3f}")


if __name__ == "__main__":
    main()
