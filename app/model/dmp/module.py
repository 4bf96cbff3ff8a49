"""The DMP module: prompts P (pt_depth, N, D) mixed per sample by a gate on [c or t_emb; depth]."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.core.errors import PatchError
from app.model.dmp.gate import gate_logits, num_kept, select
from app.model.kernels import PromptAdd

GATE_INPUTS = ("c", "t")
METHODS = ("dmp", "pt")  # pt = plain prompt tuning baseline: x + P[l], no gate tensors
SELECTIONS = ("softmax", "hard")  # top-k weights: softmax renormalised over the kept (official code) | 1 (paper)


@dataclass(frozen=True)
class Gating:
    """One forward's gate values, returned (not kept on the module) for the balancing losses and gate maps."""

    gates: torch.Tensor  # (L, B, N) selected weights, before gate_scale
    logits: torch.Tensor  # (L, B, N) what the selection saw (noisy in noisy-gated training)
    clean_logits: torch.Tensor | None = None  # (L, B, N) before the noise; None without noisy gating
    noise_std: torch.Tensor | None = None  # (B, N)

    def gathered(self, gather_rows: Callable[[torch.Tensor, int], torch.Tensor]) -> Gating:
        """Every rank's rows (data parallelism): `gather_rows(tensor, batch_dim)` on each tensor."""
        return replace(self, gates=gather_rows(self.gates, 1), logits=gather_rows(self.logits, 1),
                       clean_logits=None if self.clean_logits is None else gather_rows(self.clean_logits, 1),
                       noise_std=None if self.noise_std is None else gather_rows(self.noise_std, 0))


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

    @property
    def k(self) -> int:
        return num_kept(self.top_k, self.num_tokens)

    def gate_logits(self, g_in: torch.Tensor) -> torch.Tensor:
        """Logits of every block -> (pt_depth, B, N)."""
        w = self.gate.weight.to(g_in.dtype)
        return gate_logits(g_in, w[:, :-1], w[:, -1], self.gate.bias.to(g_in.dtype), self.pt_depth)

    def forward(self, c: torch.Tensor, t_emb: torch.Tensor, noise: torch.Tensor | None = None,
                t_perm: torch.Tensor | None = None) -> Gating:
        """This forward's gating; in noisy-gated training `noise` (pt_depth, B, N) holds the standard normal
        draws (a trainer draws them for its global batch), None = drawn here; `t_perm` (B,) a batch permutation
        for the shuffled-timestep control."""
        if self.method == "pt":
            ones = torch.ones(self.pt_depth, c.shape[0], self.num_tokens, device=c.device, dtype=c.dtype)
            return Gating(ones, ones)
        if t_perm is not None:  # the shuffled-timestep control: the gate sees another row's timestep, its own class
            c, t_emb = c - t_emb + t_emb[t_perm], t_emb[t_perm]
        g_in = c if self.gate_input == "c" else t_emb
        logits = clean = self.gate_logits(g_in)
        noise_std = None
        if self.training and self.noisy_gating:
            noise_std = F.softplus(g_in @ self.w_noise.to(g_in.dtype)) + 1e-2  # (B, N)
            noise = torch.randn_like(logits) if noise is None else noise.to(logits.dtype)
            logits = clean + noise * noise_std[None]
        gates = select(logits, self.k, self.selection == "hard")
        return Gating(gates, logits, clean if noise_std is not None else None, noise_std)

    def gates(self, c: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """Gate weights (pt_depth, B, N); rows sum to 1 (softmax), hold k ones (hard) or are all ones (pt)."""
        return self(c, t_emb).gates

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor, noise: torch.Tensor | None = None,
                t_perm: torch.Tensor | None = None) -> PatchState:
        gating = self(c, t_emb, noise, t_perm)
        return PatchState(gating.gates * self.gate_scale, self.prompts, gating)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompts": self.prompts.detach() * self.gate_scale}
        if self.method == "dmp":
            out |= {"gate.weight": self.gate.weight.detach(), "gate.bias": self.gate.bias.detach(),
                    "gate.w_noise": self.w_noise.detach()}  # (D, N) as in docs/design.md §3
        return out


class PatchState:
    """Per-forward gates of one patch applied to every sample, and the gating they came from."""

    def __init__(self, gates: torch.Tensor, prompts: torch.Tensor, gating: Gating | None = None):
        self.gates, self.prompts, self.gating = gates, prompts, gating  # (L, B, N), (L, N, D)

    def at(self, depth: int) -> PromptAdd | None:
        """What block `depth` adds to its input (nothing past pt_depth)."""
        return PromptAdd(self.gates[depth], self.prompts, None, depth) if depth < self.prompts.shape[0] else None
