"""Bodies of the OpenAI-compatible routes, shaped as the `openai` client's types (openai.types.*)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from app.api.schemas import ClassLabel, OutputFormat, PatchPart, PatchUse, Sampler


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, server_error")
    param: str | None = Field(description="The request field at fault, when one is")
    code: str = Field(description="Our machine word (the error_type of the other routes)")


class OpenAIErrorBody(BaseModel):
    """Every error reply on /v1/*."""

    error: OpenAIErrorDetail


class ModelCard(BaseModel):
    """openai.types.Model, plus where a patch comes from (`parent`, as vLLM lists LoRA adapters) and its task."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="`dmp` for a base; the base's name for a patch")
    parent: str | None = Field(description="The base a patch applies to; null for a base")
    task: str | None
    sizes: list[str] = Field(description="The `size` values /v1/images/generations accepts for this model")


class ModelCardList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ImageRequest(BaseModel):
    """openai `images.generate` parameters; OpenAI-only knobs (quality, style, ...) are accepted and ignored, any
    other field is refused (400), as OpenAI does."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: StrictStr = Field("", description="Caption (text models), class label name or "
                              "index (class models), ignored (unconditional models)")
    model: StrictStr | None = Field(None, max_length=128, description="A base or a patch name (a patch implies "
                                    "its base); optional when the server has one base")
    n: StrictInt = Field(1, ge=1, description="At most DMP_MAX_IMAGES")
    size: StrictStr | None = Field(None, max_length=32, description="`WxH` of the model, or `auto`")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="Only b64_json is served")
    output_format: StrictStr | None = Field(None, max_length=16, description="png, jpeg or webp")
    stream: StrictBool | None = False
    partial_images: StrictInt | None = Field(None, ge=0, le=3, description="Partial images when streaming")
    seed: StrictInt | None = Field(None, ge=0, le=2**53 - 1, description="Extra: same seed + request = same bytes")
    steps: StrictInt | None = Field(None, ge=1, description="Extra: denoising steps (at most DMP_MAX_STEPS)")
    sampler: Sampler | None = Field(None, description="Extra: ddpm, ddim or dpm")
    guidance_scale: StrictFloat | StrictInt | None = Field(None, ge=0, le=50, description="Extra: CFG scale")
    patch_scale: StrictFloat | StrictInt | None = Field(
        None, description="Extra: the strength of the patch `model` names (as POST /generate)")
    patches: list[PatchPart] | None = Field(None, description="Extra: a composition on the base `model` names "
                                            "(as POST /generate)")
    seeds: list[StrictInt] | None = Field(None, max_length=1024, description="Extra: one seed per image")
    negative_class_label: ClassLabel | None = Field(None, description="Extra: a class to guide away from "
                                                    "(class models, guidance_scale != 1)")
    # OpenAI's own knobs, which have no meaning here: accepted (so the `openai` client's calls work) and ignored
    background: StrictStr | None = None
    moderation: StrictStr | None = None
    output_compression: StrictInt | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    user: StrictStr | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """openai.types.ImagesResponse, plus the seed and the model that ran."""

    model_config = ConfigDict(protected_namespaces=())

    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    seed: int
    seeds: list[int] = Field(description="Each image's seed")
    model: str
    patches: list[PatchUse] = Field(description="Every patch the rows added, with its version and scale")
