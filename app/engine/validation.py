"""Every request rule in one place: which base, the condition a task needs, class labels, limits (one Settings),
samplers, output formats, and the gate-map bounds. Routes and the CLI parse their own shapes, then come here."""
from __future__ import annotations

import difflib
import math
import re
import secrets
from collections.abc import Mapping, Sequence

from app.core.config import Settings
from app.core.errors import BadRequest, InvalidRequest, PatchNotReady
from app.engine.bases import ServedBase
from app.engine.images import FORMATS
from app.engine.work import Spec
from app.model.dmp import MIX_WIDTH
from app.model.sampling import SAMPLERS, TRAIN_TIMESTEPS
from app.registry.records import PatchRecord

OUTPUT_FORMATS = tuple(FORMATS)
INDEX = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII digits only: "²" is a digit to str.isdigit but not to int()
PATCH_SCALES = (-4.0, 4.0)  # a patch's strength s in x + s * g * P: 0 = the base, 1 = the patch as trained
MAX_SEED = 2**53 - 1  # JSON numbers stay exact up to here


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


def patch_scale(value: object, field: str, say: str | None = None) -> float:
    """A patch strength: a finite JSON number within PATCH_SCALES; `say`: the field as the message names it."""
    lo, hi = PATCH_SCALES
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{say or field} must be a number in [{lo:g}, {hi:g}]", field)
    if not lo <= value <= hi or not math.isfinite(value):  # the range first: a huge int has no float
        raise Invalid(f"{say or field} must be a finite number in [{lo:g}, {hi:g}], got {value!r:.40}", field)
    return float(value)


def mix(patch: str | None, scale: object, patches: Sequence[Mapping] | None,
        max_patches: int = MIX_WIDTH) -> tuple[tuple[str, float], ...]:
    """The request's (name, scale) pairs: `patch` with `patch_scale` (default 1), or the `patches` composition
    (1 to `max_patches` entries {name, scale=1}, names unique); () for the bare base."""
    if patches is None:
        if patch is None:
            if scale is not None:
                raise Invalid("patch_scale needs a patch", "patch_scale")
            return ()
        return ((patch, 1.0 if scale is None else patch_scale(scale, "patch_scale")),)
    if patch is not None or scale is not None:
        raise Invalid("send either patch (with patch_scale) or patches, not both", "patches")
    if isinstance(patches, str | bytes) or not isinstance(patches, Sequence) or \
            not 1 <= len(patches) <= max_patches:
        raise Invalid(f"patches must be a list of 1 to {max_patches} {{name, scale}} entries", "patches")
    pairs: list[tuple[str, float]] = []
    for i, entry in enumerate(patches):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or not name:
            raise Invalid(f"patches[{i}] needs a name", "patches")
        if name in (n for n, _ in pairs):
            raise Invalid(f"patch {name!r} appears twice in patches", "patches")
        pairs.append((name, patch_scale(entry.get("scale", 1.0), "patches", f"patches[{i}].scale")))
    return tuple(pairs)


def image_seeds(seed: int | None, seeds: Sequence[int] | None, num_images: int) -> tuple[int, tuple[int, ...], bool]:
    """(first seed, every image's seed, seeded): image i gets seed + i unless `seeds` lists one per image."""
    if seeds is not None:
        if seed is not None:
            raise Invalid("send either seed (image i gets seed + i) or seeds (one per image), not both", "seeds")
        if isinstance(seeds, str | bytes) or len(seeds) != num_images:
            raise Invalid(f"seeds must list one seed per image ({num_images})", "seeds")
        if any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED for s in seeds):
            raise Invalid(f"every seed must be an integer in [0, {MAX_SEED}]", "seeds")
        return seeds[0], tuple(seeds), True
    seeded = seed is not None
    first = secrets.randbits(31) if seed is None else seed
    return first, tuple(first + i for i in range(num_images)), seeded


def negative_class(base: ServedBase, label: int | str | None, guidance: float) -> int | None:
    """A class to guide away from (class models, with CFG on), checked like class_label."""
    if label is None:
        return None
    if base.task != "class":
        raise Invalid(f"model {base.name} is not class-conditional: negative_class_label is for class models",
                      "negative_class_label")
    if guidance == 1.0:
        raise Invalid("negative_class_label needs guidance_scale != 1: it replaces the null class in CFG",
                      "negative_class_label")
    try:
        return class_label(base, label)
    except Invalid as e:
        raise Invalid(e.message.replace("class_label", "negative_class_label"), "negative_class_label") from None


def spec(settings: Settings, base: ServedBase, patch: str | None, label: int | str | None, caption: str | None,
         num_images: int, steps: int | None, sampler: str | None, guidance_scale: float | None, seed: int | None,
         output_format: str, patches: tuple[tuple[str, float], ...] = (), seeds: Sequence[int] | None = None,
         negative_label: int | str | None = None) -> Spec:
    """The request checked against the base and the limits, every default filled in; `patches`: mix's pairs."""
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
    negative = negative_class(base, negative_label, guidance)
    seed, per_image, seeded = image_seeds(seed, seeds, num_images)
    first = patches[0][0] if patches else None  # `patch`, or a composition's first patch (metrics, routing)
    return Spec(base.name, first, label, caption, num_images, steps, sampler, guidance, seed, output_format, seeded,
                patches=patches, seeds=per_image, negative_class_label=negative)


def gate_timesteps(settings: Settings, timesteps: int, blocks: int, prompts: int) -> int:
    """`timesteps` if its map (blocks x timesteps x prompts values) fits DMP_GATE_MAX_VALUES, else 422."""
    cap = max(2, settings.gate_max_values // (blocks * prompts))
    if timesteps > cap:
        raise Invalid(f"timesteps must be at most {cap} for this patch ({blocks} blocks x {prompts} prompts; "
                      f"DMP_GATE_MAX_VALUES={settings.gate_max_values})", "timesteps")
    return timesteps
