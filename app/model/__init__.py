"""Model layer shared by the server and the trainer: DiT, DMP patches, loaders, VAE, text, sampling."""
from app.model.dit import DiT, DiT_models, DiTConfig
from app.model.dmp import DMP, PatchError, PatchPool, load_patch, save_patch
from app.model.loaders import CheckpointError, fingerprint, load_base, save_base
from app.model.sampling import SAMPLERS, denoise_step, generate, new_job

__all__ = ["DiT", "DiTConfig", "DiT_models", "DMP", "PatchError", "PatchPool", "load_patch", "save_patch",
           "CheckpointError", "fingerprint", "load_base", "save_base", "SAMPLERS", "denoise_step", "generate",
           "new_job"]
