"""Bucketed denoiser forward: CUDA graphs per batch bucket on GPU, padded eager (or compiled) on CPU.

The patch pool's tensors have fixed addresses and every row carries its slot index as a graph input, so one
graph serves any mix of patches, and installing a patch (an in-place copy into a free slot) needs no
recapture. Batches are padded to the next bucket (padding rows: zero latents, the null condition, slot 0);
rows never interact in a DiT forward, so padding does not change the real rows. Shapes above the largest
bucket, or a patch given as a module rather than a pool slot, run eagerly and are counted in `fallbacks`.
On CPU, `compile=True` runs each bucket through torch.compile with weight freezing (Inductor folds the frozen
base weights into prepacked oneDNN GEMMs) and math attention (for DiT's short sequences Inductor's fused
bmm-softmax-bmm beats the CPU flash kernel); the pool tensors stay inputs, so installs need no recompile.
"""
from __future__ import annotations

import contextlib

import torch
from torch._inductor import config as inductor_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.model.dit import DiT
from app.model.dmp import PatchPool, PooledPatch

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # images per batch, before CFG doubling


def row_buckets(buckets=BUCKETS, cfg: bool = True) -> list[int]:
    """Forward rows per bucket: CFG doubles each image into a conditional and an unconditional row."""
    return sorted({b * (2 if cfg else 1) for b in buckets})


class GraphedForward:
    """`forward(x, t, y, patch=None)` for denoise_step: pads to a bucket and replays that bucket's CUDA graph.

    x (B, C, H, W) fp32, t (B,), y (B,) labels or (B, text_dim); patch: None (the base, slot 0) or
    `pool.batch(slots)`. Returns fp32 (B, C_out, H, W). The model may be bf16: inputs are cast inside, the
    timestep features, gates and output stay fp32.
    """

    def __init__(self, model: DiT, pool: PatchPool | None, buckets=BUCKETS, cfg: bool = True,
                 compile: bool = False):
        self.model, self.pool = model, pool
        self.rows = row_buckets(buckets, cfg)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = self.device.type == "cuda"
        self.compiled = None
        if compile and not self.use_graphs:
            # Only tensor guards (shape, dtype) stay: they pick the bucket. Guards on the parameters would cost
            # ~0.3 ms a call and protect nothing, since freezing folds the weights into the compiled code.
            self.compiled = torch.compile(model, dynamic=False,
                                          options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})
        self.graphs: dict[int, tuple] = {}  # rows -> (CUDAGraph, static inputs dict, static output)
        self.mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.fallbacks = 0  # forwards that ran eagerly (no bucket fits, or a module patch)
        self.replays = 0
        self.captures = 0
        cfg_ = model.config
        self.x_shape = (cfg_.in_channels, cfg_.input_size, cfg_.input_size)
        self.y_shape = (cfg_.text_dim,) if cfg_.task == "text" else ()
        self.y_dtype = torch.float32 if cfg_.task == "text" else torch.long

    # ---------------------------------------------------------------- buffers
    def _static_inputs(self, rows: int) -> dict[str, torch.Tensor]:
        """Padding-valued input buffers for one bucket: zero latents, t = 0, the null condition, slot 0."""
        return {
            "x": torch.zeros(rows, *self.x_shape, device=self.device),
            "t": torch.zeros(rows, device=self.device),
            "y": self.model.null_y(rows, self.device).to(self.y_dtype).clone(),
            "slots": torch.zeros(rows, dtype=torch.long, device=self.device),
        }

    def _fill(self, buf: dict[str, torch.Tensor], x, t, y, slots) -> None:
        """Copy a batch into the first rows of the static buffers and reset the rest to padding values."""
        n = x.shape[0]
        buf["x"][:n].copy_(x)
        buf["x"][n:].zero_()
        buf["t"][:n].copy_(t)
        buf["t"][n:].zero_()
        buf["y"][:n].copy_(y)
        buf["y"][n:].copy_(self.model.null_y(buf["y"].shape[0] - n, self.device))
        buf["slots"][:n].copy_(slots)
        buf["slots"][n:].zero_()

    def _run(self, buf: dict[str, torch.Tensor], module=None) -> torch.Tensor:
        """The denoiser on the static buffers (what a graph captures)."""
        module = self.model if module is None else module
        patch = self.pool.batch(buf["slots"]) if self.pool is not None else None  # pool=None: no patch work
        with self._compile_context() if module is self.compiled else contextlib.nullcontext():
            return module(buf["x"].to(self.dtype), buf["t"], buf["y"], patch=patch).float()  # (R, C_out, H, W)

    @staticmethod
    @contextlib.contextmanager
    def _compile_context():
        """Freezing must be on when Inductor compiles (torch.compile's options= does not reach it); the C++
        wrapper calls the kernels without a Python frame per op (~0.5 ms a forward at the demo size)."""
        with inductor_config.patch(freezing=True, cpp_wrapper=True), sdpa_kernel([SDPBackend.MATH]):
            yield

    # ---------------------------------------------------------------- capture
    @torch.no_grad()
    def capture(self, rows: list[int] | None = None, warmup: int = 2) -> None:
        """Warm up and capture one graph per bucket (largest first, so smaller ones reuse its memory)."""
        if not self.use_graphs:
            for r in rows or self.rows:  # CPU: warm (and compile) each bucket shape once
                self._ensure_cpu_bucket(r)
            return
        for r in sorted(rows or self.rows, reverse=True):
            if r in self.graphs:
                continue
            buf = self._static_inputs(r)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture: Triton JIT, cuBLAS handles, allocator
                for _ in range(warmup):
                    self._run(buf)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                out = self._run(buf)
            self.graphs[r] = (graph, buf, out)
            self.captures += 1
        torch.cuda.synchronize()

    def _ensure_cpu_bucket(self, rows: int) -> None:
        if rows not in self.graphs:
            self.graphs[rows] = (None, self._static_inputs(rows), None)
            if self.compiled is not None:
                with torch.no_grad():
                    self._run(self.graphs[rows][1], self.compiled)

    def bucket_for(self, rows: int) -> int | None:
        return next((r for r in self.rows if r >= rows), None)

    # ---------------------------------------------------------------- forward
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, patch=None) -> torch.Tensor:
        n = x.shape[0]
        if patch is None:
            slots = torch.zeros(n, dtype=torch.long, device=x.device)
        elif isinstance(patch, PooledPatch) and patch.pool is self.pool and self.pool is not None:
            slots = patch.slots
        else:
            slots = None
        bucket = self.bucket_for(n)
        if slots is None or bucket is None or (self.use_graphs and bucket not in self.graphs):
            self.fallbacks += 1
            return self.model(x.to(self.dtype), t, y, patch=patch).float()
        if not self.use_graphs:
            self._ensure_cpu_bucket(bucket)
        graph, buf, out = self.graphs[bucket]
        self._fill(buf, x, t, y, slots)
        if graph is None:
            out = self._run(buf, self.compiled)
        else:
            graph.replay()
            self.replays += 1
        return out[:n].clone()

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self.graphs) if self.use_graphs else 0, "captures": self.captures,
                "replays": self.replays, "fallbacks": self.fallbacks}
