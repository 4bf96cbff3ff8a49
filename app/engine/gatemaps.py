"""A patch's gate weights per block x prompt over timesteps, as compact JSON or a heatmap PNG, for
/patches/{name}/gates.

The work is bounded (DMP_GATE_MAX_VALUES) and admitted like a generation (DMP_MAX_QUEUE); the forward runs on the
runner thread that owns the device, the store read, JSON and PNG on one worker thread of their own, so neither the
event loop nor the request thread pool waits; results are cached per patch version up to DMP_GATE_CACHE_BYTES."""
from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from app.engine import validation
from app.engine.bases import ServedBase
from app.model.dmp.gatemap import gate_weights, heatmap_png
from app.model.sampling import TRAIN_TIMESTEPS

DECIMALS = 5  # weights are in [0, 1]: 1e-5 is below anything a heatmap or a chart shows


@dataclass
class GateMap:
    """One computed map: the JSON body, the weights (L, T, N) for the heatmap, the PNG once drawn."""

    body: bytes
    weights: np.ndarray
    timesteps: list[int]
    title: str
    png: bytes | None = None

    @property
    def nbytes(self) -> int:
        return len(self.body) + self.weights.nbytes + len(self.png or b"")


def plain_text(title: str) -> str:
    """A title matplotlib draws as it is: every `$` escaped, so no caption is parsed as mathtext."""
    return title.replace("$", r"\$")


def gate_json(meta: dict, weights: torch.Tensor) -> bytes:
    """The JSON body: weights as float64 rounded to DECIMALS (short reprs), no whitespace."""
    rounded = weights.double().numpy().round(DECIMALS).tolist()
    return json.dumps(meta | {"weights": rounded}, separators=(",", ":")).encode()


class GateMaps:
    """Computes and caches gate maps for an engine."""

    def __init__(self, engine) -> None:
        self.engine, self.settings = engine, engine.settings
        self.cache: OrderedDict[tuple, tuple[GateMap, int]] = OrderedDict()  # key -> (map, its bytes when stored)
        self.cached_bytes = 0
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="dmp-gates")  # store reads, JSON, PNG (pyplot)

    async def get(self, name: str, class_label: str | None, caption: str | None, timesteps: int, png: bool,
                  tenant: str | None = None) -> bytes:
        """The JSON body, or the heatmap PNG, of `name`'s current version for this condition (a patch `tenant`
        sees: PatchRegistry.get)."""
        self.engine.check_admitting()
        record = validation.ready(self.engine.registry.get(name, tenant))
        base = self.engine.base(record.base)
        label, caption = validation.condition(base, class_label, caption, self.settings, required=False)
        key = (name, record.version, label, caption, timesteps)
        entry = self._lookup(key)
        if entry is None or (png and entry.png is None):
            with self.engine.admission():
                if entry is None:
                    entry = await self._compute(base, record, label, caption, timesteps)
                if png and entry.png is None:
                    entry.png = await self._on_worker(heatmap_png, torch.from_numpy(entry.weights),
                                                      entry.timesteps, title=entry.title)
            self._store(key, entry)
        if png:
            assert entry.png is not None, "rendered above when missing"
            return entry.png
        return entry.body

    async def _compute(self, base: ServedBase, record, label: int | None, caption: str | None,
                       timesteps: int) -> GateMap:
        patch = await self._on_worker(self.engine.registry.fetch, record.name, record.version)
        blocks, prompts = patch.pt_depth, patch.num_tokens
        validation.gate_timesteps(self.settings, timesteps, blocks, prompts)
        y, condition = await self._condition(base, label, caption)
        ts = np.unique(np.linspace(0, TRAIN_TIMESTEPS - 1, timesteps).round().astype(int)).tolist()
        future = self.engine.batcher.call(partial(gate_weights, base.model, patch, y, ts))
        weights = await asyncio.wait_for(asyncio.wrap_future(future), self.settings.request_timeout)  # (L, T, N)
        meta = {"name": record.name, "version": record.version, "base": record.base, "method": patch.method,
                "gate_input": patch.gate_input, "top_k": patch.top_k, "condition": condition,
                "blocks": weights.shape[0], "prompts": weights.shape[2], "timesteps": ts}
        body = await self._on_worker(gate_json, meta, weights)
        title = plain_text(f"{record.name} {record.version}: gate weight, {condition['text']}")
        return GateMap(body, weights.float().numpy(), ts, title)

    async def _condition(self, base: ServedBase, label: int | None, caption: str | None):
        """The y to average over (on the model's device) and what it means in words."""
        model = base.model
        device = next(model.parameters()).device
        if base.task == "class":
            n = model.config.num_classes
            if label is None:
                return torch.arange(n), {"class_label": None, "text": f"mean over all {n} classes"}
            name = base.labels[label] if label < len(base.labels) else str(label)
            return torch.tensor([label]), {"class_label": label, "text": f"class {label} ({name})"}
        if caption is not None:
            y = await self._on_worker(self.engine.encode, base, caption)
            return y, {"caption": caption, "text": f"caption {caption!r}"}
        return model.null_y(1, device), {"text": "the null condition"}

    async def _on_worker(self, fn, *args, **kw):
        return await asyncio.wrap_future(self.worker.submit(fn, *args, **kw))

    def _lookup(self, key: tuple) -> GateMap | None:
        with self.lock:
            if key not in self.cache:
                return None
            self.cache.move_to_end(key)
            return self.cache[key][0]

    def _store(self, key: tuple, entry: GateMap) -> None:
        """Keep the entry (at its size now) while DMP_GATE_CACHE_BYTES drops the least recently used ones."""
        with self.lock:
            _, old_size = self.cache.pop(key, (None, 0))
            self.cached_bytes -= old_size
            size = entry.nbytes
            if size > self.settings.gate_cache_bytes:
                return
            self.cache[key] = (entry, size)
            self.cached_bytes += size
            while self.cached_bytes > self.settings.gate_cache_bytes:
                _, (_, dropped) = self.cache.popitem(last=False)
                self.cached_bytes -= dropped

    def stop(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
