"""Every request rule in one place: which base, the condition a task needs, class labels, limits (one Settings),
samplers, output formats, and the gate-map bounds. Routes and the CLI parse their own shapes, then come here."""
from __future__ import annotations

import difflib
import re
import secrets

from app.core.config import Settings
from app.core.errors import BadRequest, InvalidRequest, PatchNotReady
from app.engine.bases import ServedBase
from app.engine.images import FORMATS
from app.engine.work import Spec
from app.model.sampling import SAMPLERS, TRAIN_TIMESTEPS
from app.registry.records import PatchRecord

OUTPUT_FORMATS = tuple(FORMATS)
INDEX = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII digits only: "²" is a digit to str.isdigit but not to int()


class Invalid(InvalidRequest):
    """A request field out of its rules; `field` names it (the /v1 routes report it as OpenAI's `param`)."""

    def __init__(self, message: str, field: str | None = None, **kw):
        super().__init__(message, **kw)
        self.field = field


def ready(record: PatchRecord) -> PatchRecord:
    if record.state != "ready":
        raise PatchNotReady(f"patch {record.name!r} is {record.state}" + (f": {record.error}" if record.error else ""))
    return record


def base_name(bases: dict[str, ServedBase], model: str | None, record: PatchRecord | None) -> str:
    """The base a request names: `model`, else the patch's base, else the only base served."""
    if model is not None:
        return model
    if record is not None and record.base is not None:
        return record.base
    if len(bases) == 1:
        return next(iter(bases))
    raise Invalid(f"say which model: this server serves {', '.join(bases) or 'none'}", "model",
                  error_type="model_required")


def class_id(base: ServedBase, name: str) -> int:
    """A class label given by name (any synonym, any case) -> its id; unknown: 400 naming up to 3 close ones."""
    key = name.strip().lower()
    if key in base.label_ids:
        return base.label_ids[key]
    if not base.label_ids:
        raise BadRequest(f"model {base.name} has no class names: send class_label as a number",
                         error_type="unknown_class")
    close = difflib.get_close_matches(key, base.label_ids, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BadRequest(f"model {base.name} has no class named {name!r}{hint}", error_type="unknown_class")


def class_label(base: ServedBase, label: int | str) -> int:
    """A class index, or a string that is one (ASCII digits) or a class name -> the index, checked in range."""
    if isinstance(label, str):
        text = label.strip()
        label = int(text) if INDEX.fullmatch(text) else class_id(base, text)
    n = base.config.num_classes
    if not 0 <= label < n:
        raise Invalid(f"class_label must be in [0, {n}), got {label}", "class_label")
    return label


def condition(base: ServedBase, label: int | str | None, caption: str | None, settings: Settings,
              required: bool = True) -> tuple[int | None, str | None]:
    """(class_label, caption) as the base's task takes them; `required`: the task's condition must be given."""
    wrong = {"class": ("caption", "class_label, not caption"), "text": ("class_label", "caption, not class_label"),
             "uncond": ("class_label" if label is not None else "caption", "neither class_label nor caption")}
    field, say = wrong[base.task]
    if (caption if field == "caption" else label) is not None:
        kind = "unconditional" if base.task == "uncond" else f"{base.task}-conditional"
        raise Invalid(f"model {base.name} is {kind}: send {say}", field)
    if base.task == "class":
        if label is None and required:
            raise Invalid(f"model {base.name} needs class_label in [0, {base.config.num_classes})", "class_label")
        return (None if label is None else class_label(base, label)), None
    if base.task == "text" and caption is not None:
        if len(caption) > settings.max_caption_chars:
            raise Invalid(f"caption is {len(caption)} characters, over {settings.max_caption_chars}", "caption")
        if not caption.strip():
            if required:
                raise Invalid(f"model {base.name} needs a non-empty caption", "caption")
            caption = None
    elif base.task == "text" and required:
        raise Invalid(f"model {base.name} needs a non-empty caption", "caption")
    return None, caption


def spec(settings: Settings, base: ServedBase, patch: str | None, label: int | str | None, caption: str | None,
         num_images: int, steps: int | None, sampler: str | None, guidance_scale: float | None, seed: int | None,
         output_format: str) -> Spec:
    """The request checked against the base and the limits, every default filled in."""
    label, caption = condition(base, label, caption, settings)
    if num_images > settings.max_images:
        raise Invalid(f"num_images must be at most {settings.max_images} (DMP_MAX_IMAGES)", "num_images")
    if output_format not in OUTPUT_FORMATS:
        raise Invalid(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}", "output_format")
    sampler = sampler or base.default_sampler
    if sampler not in SAMPLERS:
        raise Invalid(f"sampler must be one of {', '.join(SAMPLERS)}", "sampler")
    # DPM-Solver++ over all 1000 training steps reaches sigma = 0 and returns NaN: one step fewer is fine
    max_steps = min(settings.max_steps, TRAIN_TIMESTEPS - (sampler == "dpm"))
    steps = min(base.default_steps, max_steps) if steps is None else steps
    if not 1 <= steps <= max_steps:
        raise Invalid(f"steps must be in [1, {max_steps}] for sampler {sampler}, got {steps}", "steps")
    if steps * num_images > settings.max_cost:
        raise Invalid(f"steps * num_images = {steps * num_images} is over DMP_MAX_COST={settings.max_cost}",
                      "steps", error_type="cost_too_high")
    guidance = base.default_guidance if guidance_scale is None else float(guidance_scale)
    if base.task == "uncond":
        guidance = 1.0  # nothing to guide towards
    seeded = seed is not None
    seed = secrets.randbits(31) if seed is None else seed
    return Spec(base.name, patch, label, caption, num_images, steps, sampler, guidance, seed, output_format, seeded)


def gate_timesteps(settings: Settings, timesteps: int, blocks: int, prompts: int) -> int:
    """`timesteps` if its map (blocks x timesteps x prompts values) fits DMP_GATE_MAX_VALUES, else 422."""
    cap = max(2, settings.gate_max_values // (blocks * prompts))
    if timesteps > cap:
        raise Invalid(f"timesteps must be at most {cap} for this patch ({blocks} blocks x {prompts} prompts; "
                      f"DMP_GATE_MAX_VALUES={settings.gate_max_values})", "timesteps")
    return timesteps
