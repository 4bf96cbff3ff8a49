"""Request and response bodies of the HTTP API (docs/design.md §4)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from app.engine.images import OutputFormat
from app.model.sampling import Sampler

ClassLabel = Annotated[StrictInt, Field(ge=0, le=100_000)] | Annotated[StrictStr, Field(min_length=1, max_length=200)]


class ErrorBody(BaseModel):
    """Every error reply."""

    error: str = Field(description="What went wrong, for a human")
    error_type: str = Field(description="What went wrong, for a program")


class PatchPart(BaseModel):
    """One patch of a composition and its strength."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(max_length=64)
    scale: StrictFloat | StrictInt = Field(1.0, description="Strength s in x + s * g * P: a finite number in "
                                           "[-4, 4]; 0 = the base's pixels, 1 = the patch as trained")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: StrictStr | None = Field(None, max_length=128, description="Base name; optional with a patch or one base")
    patch: StrictStr | None = Field(None, max_length=64, description="Patch name; null = the base model")
    patch_scale: StrictFloat | StrictInt | None = Field(
        None, description="With `patch`: its strength s (rows add s * g * P), a finite number in [-4, 4]; default 1. "
                          "0 gives the base's pixels, 1 the patch's, negative subtracts the patch's effect")
    patches: list[PatchPart] | None = Field(
        None, description="A composition instead of `patch`: 1 to 4 patches of one base, names unique; each row "
                          "adds sum_i scale_i * g_i * P_i, every patch with its own gate")
    seeds: list[StrictInt] | None = Field(None, max_length=1024, description="One seed per image (instead of "
                                          "`seed`; its length is num_images); each image reproduces alone")
    negative_class_label: ClassLabel | None = Field(
            None, description="Class models with guidance_scale != 1: guide away from this class (index or name) "
                              "instead of the null class")
    class_label: ClassLabel | None = Field(
            None, description="Class index, or a class name: any synonym of a label in GET /models, "
                              "any case (class models); an unknown name is 400 unknown_class")
    caption: StrictStr | None = Field(None, description="Caption (text models); at most DMP_MAX_CAPTION_CHARS")
    num_images: StrictInt = Field(1, ge=1, description="At most DMP_MAX_IMAGES")
    steps: StrictInt | None = Field(None, ge=1, description="Denoising steps; default from the model; at most "
                                                           "DMP_MAX_STEPS")
    sampler: Sampler | None = None
    guidance_scale: StrictFloat | StrictInt | None = Field(None, ge=0, le=50)
    seed: StrictInt | None = Field(None, ge=0, le=2**53 - 1, description="Same seed + request = same pixels; "
                                   "image i uses seed + i")
    output_format: OutputFormat = "png"
    previews: StrictInt = Field(0, ge=0, le=10, description="With Accept: text/event-stream: how many `progress` "
                                "events (evenly spaced) carry the current x0 prediction as PNGs")


class PatchRef(BaseModel):
    name: str
    version: str


class PatchUse(PatchRef):
    scale: float


class Timings(BaseModel):
    queue_ms: float
    sample_ms: float
    decode_ms: float


class GenerateResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    images: list[str] = Field(description="Base64-encoded files in output_format")
    seed: int = Field(description="The first image's seed")
    seeds: list[int] = Field(description="Each image's seed: a 1-image request with seeds[i] reproduces image i")
    model: str
    patch: PatchRef | None = Field(description="The patch (a composition's first); null for the bare base")
    patches: list[PatchUse] = Field(description="Every patch the rows added, with its version and scale")
    output_format: OutputFormat
    cached: bool = False
    timings: Timings


class ModelInfo(BaseModel):
    name: str
    task: Literal["uncond", "class", "text"]
    num_classes: int
    image_size: int
    hidden_size: int
    depth: int
    num_tokens: int
    in_channels: int
    patch_size: int
    text_dim: int
    fingerprint: str
    vae: str = Field(description='"pixel", or "sd" for a latent model served through its AutoencoderKL')
    layout: str = Field(description="Where the base came from: safetensors | pt | diffusers | pipeline")
    text_encoder: str | None
    labels: list[str] = Field(description='Class i\'s name; synonyms separated by ", " (any is accepted as '
                                          "class_label)")
    default_sampler: Sampler
    default_steps: int
    default_guidance: float
    patches: list[str]


class ModelList(BaseModel):
    models: list[ModelInfo]


class PatchInfo(BaseModel):
    name: str
    base: str | None
    version: str
    state: Literal["loading", "ready", "failed", "retired"]
    resident: Literal["stored", "host", "device"] = Field(
        description="Where the current version is: only in the store, validated in host memory, or in a device slot")
    task: str | None
    domain: str | None
    method: str | None
    size_bytes: int
    error: str | None
    updated_at: float
    generation: int = Field(0, description="Orders writes of this name across replicas; only moves forward")
    signer: str | None = Field(None, description="Key id (sha256 of the PEM public key) of the signature that "
                                                 "verified; null when DMP_PATCH_PUBLIC_KEYS is unset")
    owner: str | None = Field(None, description="The tenant (of DMP_API_KEYS) the patch belongs to; null = shared")


class PatchDetail(PatchInfo):
    metadata: dict[str, str]
    versions_held: list[str] = Field(description="Retired versions still used by running requests")


class PatchList(BaseModel):
    patches: list[PatchInfo]


class PatchEvent(BaseModel):
    version: str
    event: str = Field(description="installed | deleted")
    at: float = Field(description="Unix time this replica saw it")


class PatchHistory(BaseModel):
    name: str
    current: str | None = Field(description="The version served now; null when deleted")
    history: list[PatchEvent] = Field(description="Newest first; this replica's view since it started (at most 20)")


class Health(BaseModel):
    status: str
    detail: str | None = Field(None, description="Entries of DMP_MODEL_DIR that are not served, and why")
