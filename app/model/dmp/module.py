"""The DMP module: prompts P (pt_depth, N, D) mixed per sample by a gate on [c or t_emb; depth]."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.core.errors import PatchError
from app.model.dmp.gate import gate_logits, hard_weights, keep_top_k, num_kept
from app.model.kernels import PromptAdd

GATE_INPUTS = ("c", "t")
METHODS = ("dmp", "pt")  # pt = plain prompt tuning baseline: x + P[l], no gate tensors
SELECTIONS = ("softmax", "hard")  # top-k weights: softmax renormalised over the kept (official code) | 1 (paper)


class DMP(nn.Module):
    """Prompts P (pt_depth, N, D) mixed by a linear gate on [c or t_emb; depth]; zero-initialised."""

    def __init__(self, hidden_size: int, num_tokens: int, pt_depth: int, gate_input: str = "c",
                 top_k: float = 1.0, method: str = "dmp", noisy_gating: bool = True, selection: str = "softmax",
                 gate_scale: float = 1.0):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise PatchError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        if method not in METHODS:
            raise PatchError(f"method must be one of {METHODS}, got {method!r}")
        if not 0 < top_k <= 1:
            raise PatchError(f"top_k must be in (0, 1], got {top_k}")
        if selection not in SELECTIONS:
            raise PatchError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        self.selection = selection
        # Ours, not the paper's: a training-time factor on the gates (N makes a uniform gate equal PT at init);
        # state_tensors() folds it into the saved prompts, so a patch file never carries it.
        self.gate_scale = gate_scale
        self.hidden_size, self.num_tokens, self.pt_depth = hidden_size, num_tokens, pt_depth
        self.gate_input, self.top_k, self.method, self.noisy_gating = gate_input, top_k, method, noisy_gating
        self.prompts = nn.Parameter(torch.zeros(pt_depth, num_tokens, hidden_size))
        if method == "dmp":
            self.gate = nn.Linear(hidden_size + 1, num_tokens)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            self.w_noise = nn.Parameter(torch.zeros(hidden_size, num_tokens))
        self.metadata: dict[str, str] = {}
        self.last_gates: torch.Tensor | None = None  # (pt_depth, B, N), kept in training for the balancing losses
        # (pt_depth, B, N) standard normal draws for the next training forward's noisy gating, set by a trainer
        # that draws them for its global batch (data parallelism); None = draw here.
        self.gate_noise: torch.Tensor | None = None
        # (B,) a permutation of the batch, set by a trainer for the shuffled-timestep control: the gate sees
        # another row's timestep embedding (its own class kept); None = its own.
        self.gate_t_perm: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return num_kept(self.top_k, self.num_tokens)

    def gate_logits(self, g_in: torch.Tensor) -> torch.Tensor:
        """Logits of every block -> (pt_depth, B, N)."""
        w = self.gate.weight.to(g_in.dtype)
        return gate_logits(g_in, w[:, :-1], w[:, -1], self.gate.bias.to(g_in.dtype), self.pt_depth)

    def gates(self, c: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """Gate weights (pt_depth, B, N); rows sum to 1 (DMP) or are all ones (plain prompt tuning)."""
        if self.method == "pt":
            return torch.ones(self.pt_depth, c.shape[0], self.num_tokens, device=c.device, dtype=c.dtype)
        if self.gate_t_perm is not None:
            c, t_emb = c - t_emb + t_emb[self.gate_t_perm], t_emb[self.gate_t_perm]
        g_in = c if self.gate_input == "c" else t_emb
        logits = self.gate_logits(g_in)
        if self.training and self.noisy_gating:
            noise_std = F.softplus(g_in @ self.w_noise.to(g_in.dtype)) + 1e-2  # (B, N)
            self.last_clean_logits, self.last_noise_std = logits, noise_std
            noise = self.gate_noise if self.gate_noise is not None else torch.randn_like(logits)
            logits = logits + noise.to(logits.dtype) * noise_std[None]
        gates = keep_top_k(logits, self.k)
        if self.selection == "hard" and self.k < self.num_tokens:
            gates = hard_weights(gates)
        if self.training:
            self.last_gates, self.last_logits = gates, logits
        return gates

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor) -> "PatchState":
        return PatchState(self.gates(c, t_emb) * self.gate_scale, self.prompts)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompts": self.prompts.detach() * self.gate_scale}
        if self.method == "dmp":
            out |= {"gate.weight": self.gate.weight.detach(), "gate.bias": self.gate.bias.detach(),
                    "gate.w_noise": self.w_noise.detach()}  # (D, N) as in docs/design.md §3
        return out


class PatchState:
    """Per-forward gates of one patch applied to every sample."""

    def __init__(self, gates: torch.Tensor, prompts: torch.Tensor):
        self.gates, self.prompts = gates, prompts  # (L, B, N), (L, N, D)

    def at(self, depth: int) -> PromptAdd | None:
        """What block `depth` adds to its input (nothing past pt_depth)."""
        return PromptAdd(self.gates[depth], self.prompts, None, depth) if depth < self.prompts.shape[0] else None
