"""One description per base: its weights, VAE, text encoder, labels and sampling defaults, whatever the layout.

Layouts (a sidecar `NAME.json` next to any of them overrides what the checkpoint itself says):
- `NAME.safetensors`: our base file; the description is its string metadata.
- `NAME.pt` / `NAME.pth`: an original facebookresearch/DiT state dict; the sidecar names the VAE.
- `NAME/` with `config.json`: a diffusers DiTTransformer2DModel folder; the sidecar names the VAE.
- `NAME/` with `model_index.json`: a diffusers DiTPipeline folder; VAE, scheduler and `id2label` come from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from app.model.loaders import CheckpointError, read_base_metadata
from app.model.sampling import SAMPLERS

BASE_SUFFIXES = (".safetensors", ".pt", ".pth")
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
PIXEL_CHANNELS = (1, 3)  # a base with other channel counts works on latents and needs a VAE
SIDECAR_KEYS = {"name", "vae", "text_encoder", "labels", "default_sampler", "default_steps", "default_guidance",
                "latent_scale", "beta_schedule", "clip_sample", "domain", "num_heads"}
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpm"}


class DescriptionError(CheckpointError):
    """A base's description is missing a piece or contradicts its files; the message says what to add."""


@dataclass
class BaseDescription:
    """Everything the server needs to know about one base besides its tensors."""

    name: str
    source: Path  # what the user dropped in DMP_MODEL_DIR
    checkpoint: Path  # the DiT weights: a file or a diffusers transformer folder
    layout: str  # safetensors | pt | diffusers | pipeline
    vae: str | None = None  # "pixel", a diffusers AutoencoderKL folder or Hub id; None = not said
    text_encoder: str = ""
    labels: list[str] = field(default_factory=list)  # class i: its synonyms joined by ", " (diffusers' id2label)
    default_sampler: str = "ddim"
    default_steps: int = 50
    default_guidance: float = 1.0
    latent_scale: float | None = None  # None: the VAE's own scaling_factor
    beta_schedule: str = "linear"
    clip_sample: bool | None = None  # None: on for pixel models, off for latent ones
    num_heads: int | None = None
    meta: dict = field(default_factory=dict)  # the rest (domain, data set, training record)


def sidecar_path(path: Path) -> Path:
    """`X.json` next to `X.pt`, `X.safetensors` or the folder `X/`."""
    return path.with_suffix(".json") if path.is_file() else path.parent / f"{path.name}.json"


def is_base_entry(path: Path) -> bool:
    """Whether a DMP_MODEL_DIR entry is meant as a base (shared VAE folders and sidecars are not)."""
    if path.is_file():
        return path.suffix in BASE_SUFFIXES
    if (path / "model_index.json").exists():
        return True
    return _class_name(path / "config.json") in DIT_CLASSES


def _class_name(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DescriptionError(f"cannot read {what} {path}: {e.strerror}") from None
    except ValueError as e:
        raise DescriptionError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DescriptionError(f"{what} {path} must hold a JSON object")
    return data


def labels_from(value, where: Path) -> list[str]:
    """Labels from a list, an `{id: "a, b"}` dict (diffusers' id2label), or a JSON file holding either."""
    if isinstance(value, str):
        path = where / value if not Path(value).is_absolute() else Path(value)
        data = json.loads(path.read_text()) if path.exists() else None
        if data is None:
            raise DescriptionError(f"labels file {path} does not exist")
        value = data.get("id2label", data) if isinstance(data, dict) else data
    if isinstance(value, dict):
        try:
            ids = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise DescriptionError("id2label keys must be class numbers") from None
        if sorted(ids) != list(range(len(ids))):
            raise DescriptionError(f"id2label must number classes 0..{len(ids) - 1} without gaps")
        return [ids[i] for i in range(len(ids))]
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return [str(v) for v in value]
    raise DescriptionError("labels must be a list of names, an id2label object, or a JSON file of either")


def label_index(labels: list[str]) -> dict[str, int]:
    """Lower-cased synonym -> class id; labels split on "," as diffusers' DiTPipeline does (a later id wins)."""
    index: dict[str, int] = {}
    for i, label in enumerate(labels):
        for synonym in label.split(","):
            if synonym.strip():
                index[synonym.strip().lower()] = i
    return index


def _local_or_id(value: str, where: Path) -> str:
    """A path relative to the sidecar when it exists there; otherwise as given (e.g. a Hub id)."""
    if value == "pixel" or Path(value).is_absolute():
        return value
    candidate = where / value
    return str(candidate) if candidate.exists() else value


def _apply(desc: BaseDescription, values: dict, where: Path, what: str) -> None:
    """Overlay string or JSON values (our metadata or a sidecar) onto a description, checking each."""
    def number(key, kind):
        try:
            return kind(values[key])
        except (TypeError, ValueError):
            raise DescriptionError(f"{what}: {key}={values[key]!r} is not a number") from None

    if "name" in values:
        desc.name = str(values["name"])
    if values.get("vae"):
        desc.vae = _local_or_id(str(values["vae"]), where)
    if "text_encoder" in values:
        desc.text_encoder = str(values["text_encoder"] or "")
    if "labels" in values:
        raw = values["labels"]
        if isinstance(raw, str) and raw.lstrip().startswith(("[", "{")):
            raw = json.loads(raw)
        desc.labels = labels_from(raw, where)
    if "default_sampler" in values:
        if values["default_sampler"] not in SAMPLERS:
            raise DescriptionError(f"{what}: default_sampler must be one of {SAMPLERS}")
        desc.default_sampler = values["default_sampler"]
    if "default_steps" in values:
        desc.default_steps = number("default_steps", int)
    if "default_guidance" in values:
        desc.default_guidance = number("default_guidance", float)
    if values.get("latent_scale") not in (None, ""):
        desc.latent_scale = number("latent_scale", float)
    if "beta_schedule" in values:
        if values["beta_schedule"] not in ("linear", "cosine"):
            raise DescriptionError(f"{what}: beta_schedule must be linear or cosine")
        desc.beta_schedule = values["beta_schedule"]
    if "clip_sample" in values:
        desc.clip_sample = str(values["clip_sample"]).lower() == "true"
    if values.get("num_heads") not in (None, ""):
        desc.num_heads = number("num_heads", int)
    if "domain" in values:
        desc.meta["domain"] = str(values["domain"])


def scheduler_defaults(config: dict) -> dict:
    """(beta_schedule, default_sampler) from a diffusers scheduler config; refuses schedules DiT never used."""
    if config.get("num_train_timesteps", 1000) != 1000 or config.get("trained_betas"):
        raise DescriptionError("scheduler: only 1000 training steps without trained_betas are supported")
    kind = config.get("beta_schedule", "linear")
    if kind == "linear" and (abs(config.get("beta_start", 1e-4) - 1e-4) > 1e-12 or
                             abs(config.get("beta_end", 0.02) - 0.02) > 1e-12):
        raise DescriptionError("scheduler: a linear schedule must run from beta 1e-4 to 0.02 as DiT's does")
    if kind not in ("linear", "squaredcos_cap_v2"):
        raise DescriptionError(f"scheduler: beta_schedule {kind!r} is not supported (linear or squaredcos_cap_v2)")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise DescriptionError("scheduler: only epsilon prediction is supported")
    return {"beta_schedule": "cosine" if kind == "squaredcos_cap_v2" else "linear",
            "default_sampler": SCHEDULER_SAMPLERS.get(config.get("_class_name", ""), "ddim")}


def describe(path) -> BaseDescription:
    """The description of the base at `path` (file or folder), from its own files and an optional sidecar."""
    path = Path(path)
    if not path.exists():
        raise DescriptionError(f"no base at {path}")
    desc = BaseDescription(name=path.stem if path.is_file() else path.name, source=path, checkpoint=path,
                           layout="pt")
    if path.is_file() and path.suffix == ".safetensors":
        desc.layout = "safetensors"
        try:
            meta = read_base_metadata(path)
        except Exception as e:  # safetensors' own error type for a corrupt header
            raise DescriptionError(f"{path.name} is not a readable safetensors file: {e}") from None
        desc.meta = dict(meta)
        _apply(desc, {k: v for k, v in meta.items() if k in SIDECAR_KEYS}, path.parent, f"{path.name} metadata")
    elif path.is_dir() and (path / "model_index.json").exists():
        _describe_pipeline(desc, path)
    elif path.is_dir():
        desc.layout = "diffusers"
    elif path.suffix not in BASE_SUFFIXES:
        raise DescriptionError(f"{path.name}: unknown base type (use .safetensors, .pt, or a diffusers folder)")
    side = sidecar_path(path)
    if side.exists():
        values = _read_json(side, "sidecar")
        unknown = set(values) - SIDECAR_KEYS
        if unknown:
            raise DescriptionError(f"sidecar {side.name}: unknown keys {sorted(unknown)}; "
                                   f"known: {sorted(SIDECAR_KEYS)}")
        _apply(desc, values, side.parent, f"sidecar {side.name}")
    return desc


def _describe_pipeline(desc: BaseDescription, path: Path) -> None:
    """A DiTPipeline folder: transformer/ weights, vae/, scheduler/ and id2label from model_index.json."""
    index = _read_json(path / "model_index.json", "model_index")
    desc.layout, desc.checkpoint = "pipeline", path / "transformer"
    if not desc.checkpoint.is_dir():
        raise DescriptionError(f"pipeline {path.name} has no transformer/ folder")
    if (path / "vae").is_dir():
        desc.vae = str(path / "vae")
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.exists():
        for key, value in scheduler_defaults(_read_json(sched, "scheduler config")).items():
            setattr(desc, key, value)
    if index.get("id2label"):
        desc.labels = labels_from(index["id2label"], path)
    desc.default_steps, desc.default_guidance = 50, 4.0  # DiTPipeline.__call__'s defaults


def resolve_vae(desc: BaseDescription, in_channels: int) -> str:
    """The VAE spec a base is served with; refuses a latent base that does not say which VAE it needs."""
    if desc.vae:
        return desc.vae
    if in_channels in PIXEL_CHANNELS:
        return "pixel"
    side = sidecar_path(desc.source)
    raise DescriptionError(
        f"{desc.source.name} is a latent model ({in_channels} channels) and names no VAE: say which in {side.name} "
        f'next to it, {{"vae": "<diffusers AutoencoderKL folder or Hub id, e.g. stabilityai/sd-vae-ft-ema>"}} '
        "(see docs/models.md)")
