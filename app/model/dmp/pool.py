"""The serving pool: many patches of one base in fixed-address tensors; each batch row carries up to MIX_WIDTH
(slot, scale) pairs, so one forward serves rows with different patches, strengths and compositions."""
from __future__ import annotations

import torch

from app.core.errors import NoFreeSlot, PatchError
from app.model.dmp.gate import gate_logits, select
from app.model.dmp.module import DMP
from app.model.kernels import PromptAdd

MIX_WIDTH = 4  # (slot, scale) pairs per row: the most patches one request composes; fixed, so shapes never change


def mix_rows(slots: torch.Tensor, scales: torch.Tensor | None = None, width: int | None = None):
    """Per-row (slot, scale) pairs -> slots (B, K) long, scales (B, K) fp32, padded to `width` pairs when given.

    `slots` (B,) is one patch per row at scale 1 (or `scales` (B,)); (B, K <= MIX_WIDTH) is K pairs per row. Padding
    pairs are (slot 0, scale 0): the zero patch adds exactly nothing."""
    if slots.dim() == 1:
        slots = slots[:, None]
        scales = torch.ones(slots.shape, device=slots.device) if scales is None else scales[:, None]
    elif scales is None:
        raise ValueError("per-row pairs need their scales")
    if slots.shape[1] > MIX_WIDTH:
        raise ValueError(f"at most {MIX_WIDTH} patches per row, got {slots.shape[1]}")
    pad = 0 if width is None else width - slots.shape[1]
    return (torch.nn.functional.pad(slots.long(), (0, pad)),
            torch.nn.functional.pad(scales.float(), (0, pad)))  # (B, K or width) each


class PatchPool:
    """Fixed-address tensors holding up to `slots` patches of one base; slot 0 is the zero patch (= the base).

    Each sample of a batch carries a slot index, so one forward serves samples with different patches, and
    installing a patch copies into a free slot in place (no reallocation, so captured graphs stay valid).
    """

    def __init__(self, hidden_size: int, num_tokens: int, depth: int, slots: int, device="cpu",
                 dtype=torch.float32):
        self.hidden_size, self.num_tokens, self.depth, self.slots = hidden_size, num_tokens, depth, slots
        z = dict(device=device, dtype=dtype)
        self.prompts = torch.zeros(slots, depth, num_tokens, hidden_size, **z)  # (S, L, N, D)
        self.gate_w = torch.zeros(slots, num_tokens, hidden_size, **z)  # (S, N, D)
        self.gate_w_depth = torch.zeros(slots, num_tokens, **z)  # (S, N)
        self.gate_b = torch.zeros(slots, num_tokens, **z)  # (S, N)
        self.gate_on_t = torch.zeros(slots, dtype=torch.bool, device=device)
        self.ungated = torch.zeros(slots, dtype=torch.bool, device=device)
        self.keep = torch.full((slots,), num_tokens, dtype=torch.long, device=device)
        self.hard = torch.zeros(slots, dtype=torch.bool, device=device)
        self.in_use = [True] + [False] * (slots - 1)
        self.selecting: set[int] = set()  # slots whose patch keeps fewer than all N prompts (top-k ranking)

    def free_slots(self) -> int:
        return self.in_use.count(False)

    @torch.no_grad()
    def install(self, patch: DMP) -> int:
        """Copy a patch into a free slot and return its index."""
        if patch.hidden_size != self.hidden_size or patch.num_tokens != self.num_tokens or \
                patch.pt_depth > self.depth:
            raise PatchError("patch shape does not fit this pool")
        if False not in self.in_use:
            raise NoFreeSlot("no free patch slot")
        slot = self.in_use.index(False)
        self.prompts[slot].zero_()
        # asynchronous from pinned host memory; stream order puts the copy before the next forward
        self.prompts[slot, :patch.pt_depth].copy_(patch.prompts, non_blocking=True)
        if patch.method == "dmp":
            self.gate_w[slot].copy_(patch.gate.weight[:, :-1], non_blocking=True)
            self.gate_w_depth[slot].copy_(patch.gate.weight[:, -1], non_blocking=True)
            self.gate_b[slot].copy_(patch.gate.bias, non_blocking=True)
        self.gate_on_t[slot] = patch.gate_input == "t"
        self.ungated[slot] = patch.method == "pt"
        self.keep[slot] = patch.k
        self.hard[slot] = patch.selection == "hard"
        if patch.k < self.num_tokens:
            self.selecting.add(slot)
        self.in_use[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if slot == 0:
            raise ValueError("slot 0 is the base and is never freed")
        self.in_use[slot] = False
        self.selecting.discard(slot)

    def needs_top_k(self, slots: torch.Tensor) -> bool:
        """Whether any of these slots holds a patch that keeps fewer than all prompts (reads the slots only while
        the pool holds such a patch: the recipe's patches keep all, and the check then costs no host sync)."""
        return bool(self.selecting) and not self.selecting.isdisjoint(slots.unique().tolist())

    def batch(self, slots: torch.Tensor, scales: torch.Tensor | None = None,
              top_k: bool | None = None) -> PooledPatch:
        """Rows' patches: `slots` (B,) one per row at scale 1, or (B, K) slots with `scales` (B, K) (mix_rows).
        `top_k`: whether the gates rank prompts for top-k selection; None decides from the slots (needs_top_k),
        a compiled step passes it as a constant of its graph."""
        slots, scales = mix_rows(slots, scales)
        return PooledPatch(self, slots, scales, self.needs_top_k(slots) if top_k is None else top_k)


class PooledPatch:
    """Per-row (slot, scale) pairs into a pool; what the DiT forward takes as `patch` for mixed batches."""

    def __init__(self, pool: PatchPool, slots: torch.Tensor, scales: torch.Tensor, top_k: bool = True):
        self.pool, self.slots, self.scales = pool, slots, scales  # (B, K), (B, K)
        self.top_k = top_k  # False: every row's patches keep all prompts, so no ranking (the same gates)

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor, noise: torch.Tensor | None = None) -> PooledState:
        if noise is not None:
            raise ValueError("a patch pool serves patches; gate noise belongs to training a DMP module")
        p, (B, K) = self.pool, self.slots.shape
        s = self.slots.reshape(-1)  # (B*K,): each pair is gated on its own, with its own patch's gate
        # gates in fp32 whatever the model dtype: the softmax over N tokens is where bf16 would hurt
        g_in = torch.where(p.gate_on_t[s][:, None], t_emb.repeat_interleave(K, 0),
                           c.repeat_interleave(K, 0)).float()  # (B*K, D)
        logits = gate_logits(g_in, p.gate_w[s].to(g_in.dtype), p.gate_w_depth[s].to(g_in.dtype),
                             p.gate_b[s].to(g_in.dtype), p.depth)  # (L, B*K, N)
        keep = p.keep[s] if self.top_k else p.num_tokens  # k = N: select() skips the ranking, mask all-true
        gates = select(logits, keep, p.hard[s])  # the trainer's own selection (gate.py), per pair
        gates = torch.where(p.ungated[s][None, :, None], torch.ones_like(gates), gates)
        # s_i * g_i: the strength scales the gate, so x + sum_i s_i g_i P_i is one product per pair
        gates = gates.reshape(p.depth, B, K, -1) * self.scales[None, :, :, None]  # (L, B, K, N)
        return PooledState(gates, p.prompts, self.slots)


class PooledState:
    """Per-forward gates of a pool batch, each row with its own (slot, scale) pairs."""

    gating = None  # a served pool returns no training values

    def __init__(self, gates: torch.Tensor, prompts: torch.Tensor, slots: torch.Tensor):
        self.gates, self.prompts, self.slots = gates, prompts, slots  # (L, B, K, N) scaled, (S, L, N, D), (B, K)

    def at(self, depth: int) -> PromptAdd:
        """What block `depth` adds to its input: each row's scaled, gated prompts from its own slots."""
        return PromptAdd(self.gates[depth], self.prompts, self.slots, depth)


