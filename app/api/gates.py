"""/patches/{name}/gates: a patch's softmax gate weights per block x prompt over timesteps, as JSON or a heatmap."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import RegistryDep
from app.api.patches import PatchName
from app.api.responses import errors
from app.core.errors import InvalidRequest, PatchNotReady
from app.engine.engine import Engine, class_id
from app.model.dmp.gatemap import gate_weights, heatmap_png
from app.model.sampling import TRAIN_TIMESTEPS
from app.registry.registry import PatchRegistry

router = APIRouter(prefix="/patches", tags=["patches"])
CACHED = 64  # (patch version, condition, timesteps) entries kept

ClassLabel = Annotated[str | None, Query(description="Class id or name (class bases); omitted: the mean over all "
                                                     "classes")]
Caption = Annotated[str | None, Query(max_length=1000, description="Caption (text bases); omitted: the null "
                                                                   "caption")]
Timesteps = Annotated[int, Query(ge=2, le=TRAIN_TIMESTEPS,
                                 description=f"How many timesteps, evenly spaced over [0, {TRAIN_TIMESTEPS - 1}]")]


class GateMaps:
    """Gate weights and heatmaps computed from the stored patch, cached per version (a new version misses)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.cache: OrderedDict[tuple, dict] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, registry: PatchRegistry, name: str, class_label: str | None, caption: str | None, timesteps: int, png: bool):
        record = registry.get(name)
        if record.state != "ready":
            raise PatchNotReady(f"patch {name!r} is {record.state}" + (f": {record.error}" if record.error else ""))
        base = self.engine.base(record.base)
        y, condition = self._condition(base, class_label, caption)
        key = (name, record.version, repr(condition), timesteps)
        with self.lock:
            entry = self.cache.get(key)
        if entry is None:
            entry = self._compute(registry.fetch(name, record.version), base, y, condition, timesteps, record)
        if png and "png" not in entry:
            title = f"{name} {record.version}: gate weight, {entry['condition']['text']}"
            entry["png"] = heatmap_png(torch.tensor(entry["weights"]), entry["timesteps"], title=title)
        with self.lock:
            self.cache[key] = entry
            self.cache.move_to_end(key)
            while len(self.cache) > CACHED:
                self.cache.popitem(last=False)
        return entry

    def _condition(self, base, class_label: str | None, caption: str | None) -> tuple[torch.Tensor, dict]:
        """The y to average over and what it means in words."""
        if base.task != "text" and caption is not None:
            raise InvalidRequest(f"model {base.name} is not text-conditional: send class_label, not caption")
        if base.task != "class" and class_label is not None:
            raise InvalidRequest(f"model {base.name} is not class-conditional: send caption, not class_label")
        model = base.model
        if base.task == "class":
            n = model.config.num_classes
            if class_label is None:
                return torch.arange(n), {"class_label": None, "text": f"mean over all {n} classes"}
            label = int(class_label) if class_label.strip().lstrip("-").isdigit() else class_id(base, class_label)
            if not 0 <= label < n:
                raise InvalidRequest(f"class_label must be in [0, {n}), got {label}")
            name = base.labels[label] if label < len(base.labels) else str(label)
            return torch.tensor([label]), {"class_label": label, "text": f"class {label} ({name})"}
        if base.task == "text" and caption is not None and caption.strip():
            return self.engine.encode(base, caption), {"caption": caption, "text": f"caption {caption!r}"}
        device = next(model.parameters()).device
        return model.null_y(1, device), {"text": "the null condition"}

    @staticmethod
    def _compute(patch, base, y, condition: dict, timesteps: int, record) -> dict:
        ts = np.unique(np.linspace(0, TRAIN_TIMESTEPS - 1, timesteps).round().astype(int)).tolist()
        weights = gate_weights(base.model, patch, y, ts)  # (L, T, N)
        return {"name": record.name, "version": record.version, "base": record.base, "method": patch.method,
                "gate_input": patch.gate_input, "top_k": patch.top_k, "condition": condition,
                "blocks": weights.shape[0], "prompts": weights.shape[2], "timesteps": ts,
                "weights": weights.numpy().round(5).tolist()}


def get_maps(request: Request) -> GateMaps:
    return request.app.state.gate_maps


MapsDep = Annotated[GateMaps, Depends(get_maps)]


@router.get("/{name}/gates", responses=errors(400, 404, 422, 503),
            summary="Softmax gate weights [block][timestep][prompt] of a patch for one condition")
async def gates(name: PatchName, maps: MapsDep, registry: RegistryDep, class_label: ClassLabel = None, caption: Caption = None,
                timesteps: Timesteps = 50):
    entry = await run_in_threadpool(maps.get, registry, name, class_label, caption, timesteps, False)
    return {k: v for k, v in entry.items() if k != "png"}


@router.get("/{name}/gates.png", responses={200: {"content": {"image/png": {}}}} | errors(400, 404, 422, 503),
            response_class=Response, summary="Heatmap of a patch's gate weights, one panel per block (paper Fig. 5)")
async def gates_png(name: PatchName, maps: MapsDep, registry: RegistryDep, class_label: ClassLabel = None, caption: Caption = None,
                    timesteps: Timesteps = 50):
    entry = await run_in_threadpool(maps.get, registry, name, class_label, caption, timesteps, True)
    return Response(entry["png"], media_type="image/png", headers={"Cache-Control": "no-cache"})
