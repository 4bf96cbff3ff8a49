"""Patch files: safetensors tensors plus string metadata, written atomically, validated in full when read."""
from __future__ import annotations

import json
import os
import struct
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.core.errors import PatchError
from app.model.dmp.bounds import check_magnitudes
from app.model.dmp.gate import num_kept
from app.model.dmp.module import DMP, GATE_INPUTS, METHODS, SELECTIONS

FORMAT = "dmp-patch"
FORMAT_VERSION = "1"
TASKS = ("uncond", "class", "text")
DEFAULT_MAX_PATCH_BYTES = 256 * 1024 * 1024
REQUIRED_METADATA = ("format", "format_version", "base_fingerprint", "hidden_size", "num_tokens", "pt_depth",
                     "gate_input", "top_k", "task")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The gate-selection rule a patch was trained under. 2: one selection function (gate.py:select) in training and
# serving, so hard selection weighs every kept prompt 1 at every k. Files without the key were trained when hard
# selection keeping all N prompts still meant a softmax, which no server computes (docs/design.md §2).
GATE_VERSION = "2"


def patch_to_bytes(patch: DMP, **metadata) -> bytes:
    """Serialise a patch to safetensors bytes with the docs/design.md §3 metadata."""
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": patch.method,
        "hidden_size": str(patch.hidden_size), "num_tokens": str(patch.num_tokens),
        "pt_depth": str(patch.pt_depth), "gate_input": patch.gate_input, "top_k": repr(float(patch.top_k)),
        "selection": patch.selection, "gate_version": GATE_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
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
    except RecursionError:  # e.g. 100k nested brackets
        raise PatchError("not a safetensors file: header is nested too deeply") from None
    if not isinstance(header, dict):
        raise PatchError("not a safetensors file: header is not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PatchError("__metadata__ must be an object of strings (safetensors string metadata)")
    return header


def _int_meta(meta: dict, key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise PatchError(f"metadata {key}={meta[key]!r} is not an integer") from None


def patch_from_bytes(data: bytes, base=None, max_bytes: int = DEFAULT_MAX_PATCH_BYTES) -> DMP:
    """Validate safetensors bytes in full (docs/design.md §3) and build the patch; raises PatchError."""
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
    selection = meta.get("selection", "softmax")  # files older than the option are softmax
    if selection not in SELECTIONS:
        raise PatchError(f"selection {selection!r} is not one of {SELECTIONS}")
    D, N, L = (_int_meta(meta, k) for k in ("hidden_size", "num_tokens", "pt_depth"))
    if min(D, N, L) < 1:
        raise PatchError("hidden_size, num_tokens and pt_depth must be positive")
    check_served_as_trained(meta, method, selection, top_k, N)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type for corrupt bodies
        raise PatchError(f"corrupt safetensors body: {e}") from None
    expected: dict[str, tuple[int, ...]] = {"prompts": (L, N, D)}
    if method == "dmp":
        expected |= {"gate.weight": (N, D + 1), "gate.bias": (N,)}
    optional: dict[str, tuple[int, ...]] = {"gate.w_noise": (D, N)} if method == "dmp" else {}
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
        if too_large := check_magnitudes(tensors, base):
            raise PatchError(too_large)
    patch = DMP(D, N, L, gate_input=meta["gate_input"], top_k=top_k, method=method, selection=selection)
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


def check_served_as_trained(meta: dict, method: str, selection: str, top_k: float, num_tokens: int) -> None:
    """Refuse a patch whose gates the server would compute differently from how they were trained."""
    version = meta.get("gate_version", "1")
    if version not in ("1", GATE_VERSION):
        raise PatchError(f"gate_version {version!r} is not one this server computes (1 or {GATE_VERSION})")
    if method == "dmp" and selection == "hard" and num_kept(top_k, num_tokens) == num_tokens and version == "1":
        raise PatchError(f"selection=hard with top_k={top_k} keeps all {num_tokens} prompts, and this file has no "
                         f"gate_version={GATE_VERSION}: it was trained when that meant a softmax over all prompts, "
                         "but hard selection serves every weight as 1. Set its selection metadata to 'softmax' "
                         "(how it was trained) or retrain it")


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


