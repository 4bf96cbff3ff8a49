"""DiT (Peebles & Xie) with an optional DMP patch; parameter names match facebookresearch/DiT."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from app.model import cpu_attention
from app.model.kernels import PromptAdd, add_norm_modulate
from app.model.protocols import Patch, TrainingPatch

#################################################################################
#                                  Config                                       #
#################################################################################

# Heads by hidden size, as in the DiT paper's size table.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000  # 0 = unconditional: only the null row exists
    learn_sigma: bool = True
    text_dim: int = 0  # > 0: text-conditional, y is a (B, text_dim) embedding
    # 0 = original DiT frequencies exp(-ln(1e4) i / half); 1 = diffusers' exp(-ln(1e4) i / (half - 1))
    freq_shift: int = 0
    norm2_eps: float = 1e-6  # diffusers' DiT uses 1e-5 in the MLP-side LayerNorm
    # diffusers keeps a timestep/label embedder copy in every block; when a fine-tune made them differ, blocks
    # 1.. condition on their own copies (blocks.{i}.t_embedder / y_embedder); block 0's is t_embedder / y_embedder
    block_embedders: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def task(self) -> str:
        if self.text_dim > 0:
            return "text"
        return "class" if self.num_classes > 0 else "uncond"

    def to_dict(self) -> dict:
        return asdict(self)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freq_shift=0):
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
        args = t[:, None].float() * freqs[None]  # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, drop=None):
        if drop is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, drop=None):
        """drop (B,) bool: which labels become the null class (drawn here when None, as DiT's force_drop_ids)."""
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels, drop)
        return self.embedding_table(labels)  # (B, D)

    def null(self, batch, device):
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)


class TextEmbedder(nn.Module):
    """Projects a pooled text embedding to the hidden size; a learned null embedding serves CFG."""

    def __init__(self, text_dim, hidden_size, dropout_prob):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.null_embedding = nn.Parameter(torch.zeros(1, text_dim))
        self.dropout_prob = dropout_prob

    def forward(self, emb, train, drop=None):
        if train and self.dropout_prob > 0:
            if drop is None:
                drop = torch.rand(emb.shape[0], device=emb.device) < self.dropout_prob
            emb = torch.where(drop[:, None], self.null_embedding.to(emb.dtype), emb)
        return self.proj(emb.to(self.proj[0].weight.dtype))  # (B, D)

    def null(self, batch, device):
        return self.null_embedding.detach().to(device).expand(batch, -1)


class PatchEmbed(nn.Module):
    """Image to patch tokens; named like timm's PatchEmbed so original checkpoints load."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        # contiguous: a transposed view here would make every residual add of every block follow its strides
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, D/H)
        if cpu_attention.applies(x, self.num_heads):
            return self.proj(cpu_attention.qkv_attention(qkv))  # (B, N, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D/H) each
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


GELU_TANH_2C = 2 * math.sqrt(2 / math.pi)  # 0.5 * (1 + tanh(z)) = sigmoid(2z)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation; compiled as x * sigmoid(2z), the same function written with exp, which
    Inductor vectorizes more cheaply than tanh on an AVX2 CPU (bench/README.md, "Session 9"), and on CPU in
    inference as the project's op with a cheaper exp (app/model/cpu_attention.py)."""
    if torch.compiler.is_compiling():
        if cpu_attention.gelu_applies(x):
            return cpu_attention.gelu_tanh(x)
        return x * torch.sigmoid(GELU_TANH_2C * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")  # eager: one ATen kernel, which is what diffusers' forward matches


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(gelu_tanh(self.fc1(x)))  # (B, N, hidden) inside


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    t_embedder: TimestepEmbedder  # only with DiTConfig.block_embedders (blocks 1..)
    y_embedder: LabelEmbedder | TextEmbedder

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, norm2_eps=1e-6, embedders: tuple | None = None):
        super().__init__()
        if embedders is not None:  # this block's own (t_embedder, y_embedder) copy; see DiTConfig.block_embedders
            self.t_embedder, self.y_embedder = embedders
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm2_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, prompt: PromptAdd | None = None, pending=None):
        """One block: x + gate_msa * attn(...) + gate_mlp * mlp(...). `prompt`: DMP prompts added to x first.
        `pending` (y, gate): the previous block's MLP branch, added here inside the first fused kernel rather than
        by passes of its own. Returns (x without this block's MLP branch, that branch as the next `pending`)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        y, gate = pending or (None, None)
        # x + gate * y, x + g * P, norm1, modulate: one fused kernel on CUDA (app/model/kernels.py), plain ops elsewhere
        x, h = add_norm_modulate(x, shift_msa, scale_msa, self.norm1.eps, residual=y, residual_gate=gate,
                                 prompt=prompt)  # (B, N, D) each
        x, h = add_norm_modulate(x, shift_mlp, scale_mlp, self.norm2.eps, residual=self.attn(h),
                                 residual_gate=gate_msa)
        return x, (self.mlp(h), gate_mlp)  # (B, N, D), ((B, N, D), (B, D))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c, pending=None):
        """`pending` (y, gate): the last block's MLP branch, added to x here (see DiTBlock.forward)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        y, gate = pending or (None, None)
        _, h = add_norm_modulate(x, shift, scale, self.norm_final.eps, residual=y, residual_gate=gate)
        return self.linear(h)  # (B, N, p*p*C)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; `patch` adds DMP prompts before each block."""

    meta: dict[str, str]  # set by the loaders: name, domain, sampling defaults, ...
    _fingerprint: str  # cached by loaders.fingerprint

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads

        self.x_embedder = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder, self.y_embedder = self.new_embedders()
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, stored as a frozen parameter like the original (so checkpoints carry it).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.norm2_eps,
                     self.new_embedders() if cfg.block_embedders and i > 0 else None) for i in range(cfg.depth)
        ])
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size, self.out_channels)
        self.initialize_weights()

    def new_embedders(self) -> tuple[TimestepEmbedder, LabelEmbedder | TextEmbedder]:
        cfg = self.config
        y_embedder: LabelEmbedder | TextEmbedder
        if cfg.text_dim > 0:
            y_embedder = TextEmbedder(cfg.text_dim, cfg.hidden_size, cfg.class_dropout_prob)
        else:
            y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        return TimestepEmbedder(cfg.hidden_size, freq_shift=cfg.freq_shift), y_embedder

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation layers and the output layer (adaLN-Zero).
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C, H, W)

    def null_y(self, batch: int, device) -> torch.Tensor:
        """The condition meaning 'no condition' (null class or learned null text) for CFG."""
        return self.y_embedder.null(batch, device)

    def forward(self, x, t, y, patch: Patch | None = None, drop=None, gate_noise=None, gate_t_perm=None,
                return_gating=False):
        """x (B, C, H, W), t (B,), y (B,) labels or (B, text_dim); patch: DMP module or PatchBatch;
        drop (B,) bool: the training condition dropout, when the caller draws it (the trainer, per global batch);
        gate_noise (pt_depth, B, N): a training DMP patch's noisy-gating draws, likewise; gate_t_perm (B,): the
        shuffled-timestep control's permutation of the gate's timestep input (training only).
        Returns (B, C_out, H, W), or with return_gating (that, the patch's Gating or None) for the balancing losses."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        if self.config.block_embedders and drop is None and self.training and self.y_embedder.dropout_prob > 0:
            drop = torch.rand(x.shape[0], device=x.device) < self.y_embedder.dropout_prob  # one draw for all copies
        t_emb = self.t_embedder(t)  # (B, D)
        # c: block 0's conditioning, which also drives the final layer (as in diffusers) and the DMP gate
        c = t_emb + self.y_embedder(y, self.training, drop)  # (B, D)
        if patch is None:
            patch_state = None
        elif gate_t_perm is None:
            patch_state = patch.prepare(c, t_emb, gate_noise)
        else:
            # the trainer's gate-timestep permutation: only its DMP module is given one
            patch_state = cast(TrainingPatch, patch).prepare(c, t_emb, gate_noise, gate_t_perm)
        pending = None  # each block's MLP branch is added by the next block's (or the final layer's) first kernel
        for depth, block in enumerate(cast(Iterable[DiTBlock], self.blocks)):
            c_block = c if depth == 0 or not self.config.block_embedders else \
                block.t_embedder(t) + block.y_embedder(y, self.training, drop)  # (B, D): its own copy
            x, pending = block(x, c_block, patch_state.at(depth) if patch_state is not None else None,
                               pending)  # (B, N, D)
        x = self.final_layer(x, c, pending)  # (B, N, p*p*C)
        out = self.unpatchify(x)  # (B, C_out, H, W)
        if return_gating:
            return out, patch_state.gating if patch_state is not None else None
        return out


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

def _factory(depth, hidden_size, patch_size):
    def make(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, **kwargs):
        cfg = DiTConfig(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                        hidden_size=hidden_size, depth=depth, num_heads=HEADS_BY_WIDTH[hidden_size],
                        num_classes=num_classes, learn_sigma=learn_sigma, **kwargs)
        return DiT(cfg)
    return make


DiT_models = {
    f"DiT-{size}/{p}": _factory(depth, width, p)
    for size, (depth, width) in {"XL": (28, 1152), "L": (24, 1024), "B": (12, 768), "S": (12, 384)}.items()
    for p in (2, 4, 8)
}
