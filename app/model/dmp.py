"""DMP: mixture-of-prompts patches (DESIGN §2), balancing losses, the patch pool, and patch file I/O (§3)."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.model.kernels import PromptAdd

FORMAT = "dmp-patch"
FORMAT_VERSION = "1"
TASKS = ("uncond", "class", "text")
GATE_INPUTS = ("c", "t")
METHODS = ("dmp", "pt")  # pt = plain prompt tuning baseline: x + P[l], no gate tensors
DEFAULT_MAX_PATCH_BYTES = 256 * 1024 * 1024
REQUIRED_METADATA = ("format", "format_version", "base_fingerprint", "hidden_size", "num_tokens", "pt_depth",
                     "gate_input", "top_k", "task")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PatchError(ValueError):
    """A patch file or patch request was refused; the message says why."""


def num_kept(top_k: float, num_tokens: int) -> int:
    """Prompts kept per row by hard top-k selection (all of them for soft selection, top_k=1)."""
    return max(1, min(num_tokens, int(round(top_k * num_tokens))))


def keep_top_k(logits: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Softmax over the k largest logits of each row, zeros elsewhere; k may differ per row (..., B)."""
    n = logits.shape[-1]
    if isinstance(k, int) and k >= n:
        return logits.softmax(dim=-1)
    order = logits.argsort(dim=-1, descending=True, stable=True)  # ties keep the lower token index
    k = torch.as_tensor(k, device=logits.device)
    in_top = (torch.arange(n, device=logits.device) < (k[..., None] if k.dim() else k)).expand(logits.shape)
    kept = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(-1, order, in_top)  # exactly k
    return logits.masked_fill(~kept, float("-inf")).softmax(dim=-1)


#################################################################################
#                                  DMP module                                   #
#################################################################################

class DMP(nn.Module):
    """Prompts P (pt_depth, N, D) mixed by a linear gate on [c or t_emb; depth]; zero-initialised."""

    def __init__(self, hidden_size: int, num_tokens: int, pt_depth: int, gate_input: str = "c",
                 top_k: float = 1.0, method: str = "dmp", noisy_gating: bool = True):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise PatchError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        if method not in METHODS:
            raise PatchError(f"method must be one of {METHODS}, got {method!r}")
        if not 0 < top_k <= 1:
            raise PatchError(f"top_k must be in (0, 1], got {top_k}")
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

    @property
    def k(self) -> int:
        return num_kept(self.top_k, self.num_tokens)

    def gate_logits(self, g_in: torch.Tensor) -> torch.Tensor:
        """Logits of every block in one matmul: W[:, :D] g_in + W[:, D] * depth + b -> (pt_depth, B, N)."""
        w = self.gate.weight.to(g_in.dtype)
        base = F.linear(g_in, w[:, :-1], self.gate.bias.to(g_in.dtype))  # (B, N)
        depth = torch.arange(self.pt_depth, device=g_in.device, dtype=g_in.dtype)
        return base[None] + depth[:, None, None] * w[:, -1][None, None]  # (L, B, N)

    def gates(self, c: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """Gate weights (pt_depth, B, N); rows sum to 1 (DMP) or are all ones (plain prompt tuning)."""
        if self.method == "pt":
            return torch.ones(self.pt_depth, c.shape[0], self.num_tokens, device=c.device, dtype=c.dtype)
        g_in = c if self.gate_input == "c" else t_emb
        logits = self.gate_logits(g_in)
        if self.training and self.noisy_gating:
            noise_std = F.softplus(g_in @ self.w_noise.to(g_in.dtype)) + 1e-2  # (B, N)
            self.last_clean_logits, self.last_noise_std = logits, noise_std
            logits = logits + torch.randn_like(logits) * noise_std[None]
        gates = keep_top_k(logits, self.k)
        if self.training:
            self.last_gates, self.last_logits = gates, logits
        return gates

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor) -> "PatchState":
        return PatchState(self.gates(c, t_emb), self.prompts)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"prompts": self.prompts.detach()}
        if self.method == "dmp":
            out |= {"gate.weight": self.gate.weight.detach(), "gate.bias": self.gate.bias.detach(),
                    "gate.w_noise": self.w_noise.detach()}  # (D, N) as in DESIGN §3
        return out


Patch = DMP  # a loaded patch is a DMP module carrying its file metadata


class PatchState:
    """Per-forward gates of one patch applied to every sample."""

    def __init__(self, gates: torch.Tensor, prompts: torch.Tensor):
        self.gates, self.prompts = gates, prompts  # (L, B, N), (L, N, D)

    def at(self, depth: int) -> PromptAdd | None:
        """What block `depth` adds to its input (nothing past pt_depth)."""
        return PromptAdd(self.gates[depth], self.prompts, None, depth) if depth < self.prompts.shape[0] else None


#################################################################################
#                          Balancing losses (appendix C)                        #
#################################################################################

def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation along the last dim, averaged over the rest."""
    x = x.float()
    return (x.var(dim=-1, unbiased=False) / (x.mean(dim=-1) ** 2 + eps)).mean()


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """CV^2 of each prompt's gate mass summed over the batch; gates (L, B, N)."""
    return cv_squared(gates.sum(dim=1))


def load_loss(dmp: DMP, kind: str = "smooth", temperature: float = 0.1) -> torch.Tensor:
    """How unevenly prompts are used, differentiably.

    smooth: for hard top-k with noise, Shazeer's probability that prompt n stays in the top k when its noise
    is redrawn; for soft selection, a sigmoid surrogate of "gate weight above the uniform 1/N", counted per
    prompt over the batch. reference: the original code's count of gates < 0, always zero (no gradient).
    """
    gates = dmp.last_gates  # (L, B, N)
    if gates is None:
        raise RuntimeError("load_loss needs a training forward first")
    n = gates.shape[-1]
    if kind == "reference":
        return cv_squared((gates < 0).float().sum(dim=1))
    if kind != "smooth":
        raise ValueError(f"unknown load loss {kind!r}")
    if dmp.k < n and dmp.noisy_gating and hasattr(dmp, "last_noise_std"):
        clean, noisy, std = dmp.last_clean_logits, dmp.last_logits, dmp.last_noise_std[None]
        top = noisy.topk(dmp.k + 1, dim=-1).values  # (L, B, k+1)
        in_thr, out_thr = top[..., dmp.k:dmp.k + 1], top[..., dmp.k - 1:dmp.k]
        is_in = noisy > in_thr
        normal = torch.distributions.Normal(0.0, 1.0)
        prob = torch.where(is_in, normal.cdf((clean - in_thr) / std), normal.cdf((clean - out_thr) / std))
        return cv_squared(prob.sum(dim=1))
    used = torch.sigmoid((gates * n - 1.0) / temperature)  # ~1 where the weight exceeds 1/N
    return cv_squared(used.sum(dim=1))


#################################################################################
#                      Patch pool: many patches, one batch                      #
#################################################################################

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
        self.in_use = [True] + [False] * (slots - 1)

    def free_slots(self) -> int:
        return self.in_use.count(False)

    @torch.no_grad()
    def install(self, patch: DMP) -> int:
        """Copy a patch into a free slot and return its index."""
        if patch.hidden_size != self.hidden_size or patch.num_tokens != self.num_tokens or \
                patch.pt_depth > self.depth:
            raise PatchError("patch shape does not fit this pool")
        if False not in self.in_use:
            raise PatchError("no free patch slot")
        slot = self.in_use.index(False)
        self.prompts[slot].zero_()
        self.prompts[slot, :patch.pt_depth].copy_(patch.prompts)
        if patch.method == "dmp":
            self.gate_w[slot].copy_(patch.gate.weight[:, :-1])
            self.gate_w_depth[slot].copy_(patch.gate.weight[:, -1])
            self.gate_b[slot].copy_(patch.gate.bias)
        self.gate_on_t[slot] = patch.gate_input == "t"
        self.ungated[slot] = patch.method == "pt"
        self.keep[slot] = patch.k
        self.in_use[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if slot == 0:
            raise ValueError("slot 0 is the base and is never freed")
        self.in_use[slot] = False

    def batch(self, slots: torch.Tensor) -> "PooledPatch":
        return PooledPatch(self, slots)


class PooledPatch:
    """Per-sample slot indices into a pool; what the DiT forward takes as `patch` for mixed batches."""

    def __init__(self, pool: PatchPool, slots: torch.Tensor):
        self.pool, self.slots = pool, slots  # (B,)

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor) -> "PooledState":
        p, s = self.pool, self.slots
        # gates in fp32 whatever the model dtype: the softmax over N tokens is where bf16 would hurt
        g_in = torch.where(p.gate_on_t[s][:, None], t_emb, c).float()  # (B, D)
        base = torch.einsum("bd,bnd->bn", g_in, p.gate_w[s].to(g_in.dtype)) + p.gate_b[s].to(g_in.dtype)  # (B, N)
        depth = torch.arange(p.depth, device=c.device, dtype=g_in.dtype)
        logits = base[None] + depth[:, None, None] * p.gate_w_depth[s].to(g_in.dtype)[None]  # (L, B, N)
        gates = keep_top_k(logits, p.keep[s])
        gates = torch.where(p.ungated[s][None, :, None], torch.ones_like(gates), gates)
        return PooledState(gates, p.prompts, s)


class PooledState:
    def __init__(self, gates: torch.Tensor, prompts: torch.Tensor, slots: torch.Tensor):
        self.gates, self.prompts, self.slots = gates, prompts, slots  # (L, B, N), (S, L, N, D), (B,)

    def at(self, depth: int) -> PromptAdd:
        """What block `depth` adds to its input: each row's prompts from its own slot."""
        return PromptAdd(self.gates[depth], self.prompts, self.slots, depth)


#################################################################################
#                                Patch file I/O                                 #
#################################################################################

def patch_to_bytes(patch: DMP, **metadata) -> bytes:
    """Serialise a patch to safetensors bytes with the DESIGN §3 metadata."""
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": patch.method,
        "hidden_size": str(patch.hidden_size), "num_tokens": str(patch.num_tokens),
        "pt_depth": str(patch.pt_depth), "gate_input": patch.gate_input, "top_k": repr(float(patch.top_k)),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in metadata.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in patch.state_tensors().items()}
    return st_save(tensors, metadata=meta)


def save_patch(patch: DMP, path, **metadata) -> Path:
    """Write a patch file atomically (temp file + rename)."""
    path = Path(path)
    data = patch_to_bytes(patch, **metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def read_header(data: bytes) -> dict:
    """Parse and sanity-check a safetensors header without touching tensor bytes."""
    if len(data) < 8:
        raise PatchError("not a safetensors file: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len == 0 or header_len > len(data) - 8 or header_len > 100_000_000:
        raise PatchError("not a safetensors file: bad header length (pickle or another format?)")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PatchError(f"not a safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise PatchError("not a safetensors file: header is not an object")
    return header


def _int_meta(meta: dict, key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise PatchError(f"metadata {key}={meta[key]!r} is not an integer") from None


def patch_from_bytes(data: bytes, base=None, max_bytes: int = DEFAULT_MAX_PATCH_BYTES) -> DMP:
    """Validate safetensors bytes in full (DESIGN §3) and build the patch; raises PatchError."""
    if len(data) > max_bytes:
        raise PatchError(f"patch is {len(data)} bytes, over the {max_bytes}-byte cap")
    header = read_header(data)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise PatchError(f"unknown format {meta.get('format')!r}: expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PatchError(f"unsupported format_version {meta.get('format_version')!r}: expected {FORMAT_VERSION!r}")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise PatchError(f"metadata is missing {', '.join(missing)}")
    method = meta.get("method", "dmp")
    if method not in METHODS:
        raise PatchError(f"unknown method {method!r}: expected one of {METHODS}")
    if meta["gate_input"] not in GATE_INPUTS:
        raise PatchError(f"gate_input {meta['gate_input']!r} is not one of {GATE_INPUTS}")
    if meta["task"] not in TASKS:
        raise PatchError(f"task {meta['task']!r} is not one of {TASKS}")
    try:
        top_k = float(meta["top_k"])
    except ValueError:
        raise PatchError(f"top_k {meta['top_k']!r} is not a number") from None
    if not (0 < top_k <= 1):
        raise PatchError(f"top_k {top_k} is outside (0, 1]")
    D, N, L = (_int_meta(meta, k) for k in ("hidden_size", "num_tokens", "pt_depth"))
    if min(D, N, L) < 1:
        raise PatchError("hidden_size, num_tokens and pt_depth must be positive")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type for corrupt bodies
        raise PatchError(f"corrupt safetensors body: {e}") from None
    expected = {"prompts": (L, N, D)}
    if method == "dmp":
        expected |= {"gate.weight": (N, D + 1), "gate.bias": (N,)}
    optional = {"gate.w_noise": (D, N)} if method == "dmp" else {}
    unknown = set(tensors) - set(expected) - set(optional)
    if unknown:
        raise PatchError(f"unexpected tensors {sorted(unknown)}")
    for name, shape in (expected | optional).items():
        if name not in tensors:
            if name in expected:
                raise PatchError(f"missing tensor {name!r}")
            continue
        t = tensors[name]
        if t.dtype not in FLOAT_DTYPES:
            raise PatchError(f"tensor {name!r} has dtype {t.dtype}, expected a float type")
        if tuple(t.shape) != shape:
            raise PatchError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape} from the metadata")
        if not torch.isfinite(t).all():
            raise PatchError(f"tensor {name!r} has non-finite values (NaN or Inf)")
    if base is not None:
        check_patch_fits(meta, base)
    patch = DMP(D, N, L, gate_input=meta["gate_input"], top_k=top_k, method=method)
    with torch.no_grad():
        patch.prompts.copy_(tensors["prompts"])
        if method == "dmp":
            patch.gate.weight.copy_(tensors["gate.weight"])
            patch.gate.bias.copy_(tensors["gate.bias"])
            if "gate.w_noise" in tensors:
                patch.w_noise.copy_(tensors["gate.w_noise"])
    patch.metadata = dict(meta)
    patch.eval()
    return patch


def check_patch_fits(meta: dict, base) -> None:
    """Refuse a patch made for another base (fingerprint, shapes, task)."""
    from app.model.loaders import fingerprint

    cfg = base.config
    fp = fingerprint(base)
    if meta["base_fingerprint"] != fp:
        raise PatchError(f"patch was made for base {meta['base_fingerprint'][:12]}…, "
                         f"not this base ({fp[:12]}…)")
    if int(meta["hidden_size"]) != cfg.hidden_size or int(meta["num_tokens"]) != cfg.num_tokens:
        raise PatchError(f"patch is for hidden_size={meta['hidden_size']}, num_tokens={meta['num_tokens']}; "
                         f"base has {cfg.hidden_size}, {cfg.num_tokens}")
    if int(meta["pt_depth"]) > cfg.depth:
        raise PatchError(f"pt_depth {meta['pt_depth']} exceeds the base depth {cfg.depth}")
    if meta["task"] != cfg.task:
        raise PatchError(f"patch task {meta['task']!r} does not match the base task {cfg.task!r}")


def load_patch(path, base=None, max_bytes: int = DEFAULT_MAX_PATCH_BYTES) -> DMP:
    """Load and validate a patch file; with `base`, also check shapes and fingerprint."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise PatchError(f"cannot read patch file {path}: {e.strerror}") from None
    if size > max_bytes:
        raise PatchError(f"patch file is {size} bytes, over the {max_bytes}-byte cap")
    return patch_from_bytes(path.read_bytes(), base=base, max_bytes=max_bytes)


def new_patch_for(base, pt_depth: int | None = None, **kwargs) -> DMP:
    """A zero patch shaped for `base` (all blocks by default)."""
    cfg = base.config
    return DMP(cfg.hidden_size, cfg.num_tokens, cfg.depth if pt_depth is None else pt_depth, **kwargs)


def patch_metadata_for(base, base_name: str, domain: str = "", **extra) -> dict:
    """The base-derived metadata a patch file needs (fingerprint, task, names)."""
    from app.model.loaders import fingerprint

    return {"base_fingerprint": fingerprint(base), "base_name": base_name, "task": base.config.task,
            "domain": domain or base_name, **extra}


__all__ = ["DMP", "PatchError", "PatchPool", "PooledPatch", "load_patch", "save_patch", "patch_from_bytes",
           "patch_to_bytes", "importance_loss", "load_loss", "keep_top_k", "new_patch_for", "patch_metadata_for",
           "Patch"]
