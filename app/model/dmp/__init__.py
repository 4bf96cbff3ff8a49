"""DMP patches: the module and its gate, the balancing losses, the serving pool, and patch files."""
from app.core.errors import PatchError
from app.model.dmp.gate import keep_top_k, num_kept
from app.model.dmp.losses import importance_loss, load_loss
from app.model.dmp.module import DMP, PatchState
from app.model.dmp.patchfile import (
    load_patch,
    new_patch_for,
    patch_from_bytes,
    patch_metadata_for,
    patch_to_bytes,
    read_header,
    save_patch,
)
from app.model.dmp.pool import MIX_WIDTH, PatchPool, PooledPatch, mix_rows

__all__ = ["DMP", "PatchError", "PatchState", "PatchPool", "PooledPatch", "load_patch", "save_patch",
           "patch_from_bytes", "patch_to_bytes", "read_header", "importance_loss", "load_loss", "keep_top_k",
           "num_kept", "new_patch_for", "patch_metadata_for", "MIX_WIDTH", "mix_rows"]
