"""Bucketed denoiser step: one CUDA graph per batch bucket on GPU, one compiled graph per bucket on CPU.

What a graph holds is a whole sampling step (app.model.sampling.run_step): gather the forward rows from the
images, the DiT forward with per-row patch slots, classifier-free guidance, and the batched DDIM/DDPM update.
The patch pool's tensors have fixed addresses and every row carries its (slot, scale) pairs as graph inputs of a
fixed shape, so one graph serves any mix of patches and strengths, and installing a patch (an in-place copy into a
free slot) needs no recapture. Each bucket has variants by two choices. Width: one pair per row for batches in
which no request composes patches, MIX_WIDTH pairs for those in which one does (sampling.mix_width; the width-1
graph does not pay for three unused pairs, about half of what a patch costs a compiled CPU step); warm-up makes
both unless `warm_compositions` is off, then a bucket's composing graph is made the first time a batch composes.
Ranking: the graphs warm-up makes serve batches whose patches all keep every prompt (top_k = 1, what the recipe
trains), whose gates need no top-k ranking ((L, rows x width, N, N) comparisons, ~5 % of a CPU step at the demo
size); the ranking ones are made at warm-up while the pool holds a patch that keeps fewer, else the first time a
batch holds one. Batches
are padded to the next bucket (padding rows: image 0, t = 0, the null condition, (slot 0, scale 0) pairs; padding
images: zero latents, prev = x); rows never interact in a DiT forward, so padding does not change the
real rows. Shapes above the largest bucket, or a patch given as a module rather than a pool slot, run eagerly
and are counted in `fallbacks`. `compile=True` runs each bucket's step through torch.compile with weight
freezing; the pool tensors stay inputs, so installs need no recompile. On CPU that is the graph itself (Inductor
folds the frozen base weights into prepacked oneDNN GEMMs, or with `autotune` into its own C++ GEMM template where
that times faster, calls its kernels from its C++ wrapper, and takes the CPU flash attention kernel (bf16; in
fp32, math attention while a block's scores are small, see cpu_attention). On CUDA the compiled
step (Inductor fuses the elementwise work between GEMMs itself, flash attention stays) is what the CUDA graph
captures; compiling happens in the warm-up before capture.
"""
from __future__ import annotations

import contextlib
import functools
import types
import weakref
from collections.abc import Callable
from dataclasses import fields

import torch
from torch._inductor import config as inductor_config
from torch._inductor.codecache import PyCodeCache
from torch.nn.attention import SDPBackend, sdpa_kernel

from app.model import cpu_attention
from app.model.dit import DiT
from app.model.dmp import MIX_WIDTH, PatchPool, PooledPatch, mix_rows
from app.model.sampling import SAFE_COEF, StepBatch, mix_width, run_step

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # images per batch, before CFG doubling
CPU_MATH_ATTENTION_BYTES = 1 << 20  # fp32 scores up to which compiled CPU steps take math attention, flash above
ROW_FIELDS = ("row_image", "t", "y", "slots", "patch_scales")  # StepBatch fields per forward row; others per image
STEP_FIELDS = tuple(f.name for f in fields(StepBatch))  # in the order the compiled steps take them
# Each GEMM timed in oneDNN (ATen) and in Inductor's C++ template, the faster kept: on an AMX Xeon the template's
# micro-kernel won (one shape 0.013 ms vs oneDNN's 0.030), and oneDNN's per-call cost dominated batch 1 (batch 1
# +31-40 %, batch 8 +4-10 %, bench/results/2026-12-06-cpu-autotune-gemm.log); where oneDNN wins, it stays.
CPU_AUTOTUNE: dict[str, object] = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
Variant = tuple[int, bool, int]  # (forward rows of the bucket, top-k ranking, (slot, scale) pairs per row)


def hold_cpp_refs(tensors: list[torch.Tensor]) -> list:
    """One C++ reference to each tensor, kept until release_cpp_refs: handles as Inductor's own wrapper makes them.

    Why: a tensor that Python holds has C++ refcount 1, and torch takes the GIL whenever that count moves between 1
    and 2. A compiled CPU step (C++ wrapper) gets a handle to every input and frozen constant with the GIL held,
    then drops each one inside the graph with the GIL released, so each drop (up to 91 a call for the demo base's 16-row
    step) waits for the GIL; in a server whose event loop and request threads hold it part of the time, the runner
    stalls there. With a second C++ reference the count moves between 2 and 3 and the GIL is never asked for
    (bench/results/2026-12-06-cpu-gil-b8.json: a 16-row step beside a busy Python thread, median 296 ms without, 33 ms
    with, 7.2 ms alone)."""
    return torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(tensors)


def release_cpp_refs(handles: list) -> None:
    """Drop the references hold_cpp_refs made (the handles turn back into tensors, which go out of scope)."""
    torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(handles)
    handles.clear()


def buckets_up_to(max_images: int, buckets=BUCKETS) -> tuple[int, ...]:
    """The buckets a batch of at most `max_images` images can need (graphs beyond it would never run)."""
    return tuple(b for b in buckets if b < max_images) + (next((b for b in buckets if b >= max_images),
                                                             max_images),)


def row_buckets(buckets=BUCKETS, cfg: bool = True) -> list[int]:
    """Forward rows per bucket: CFG doubles each image into a conditional and an unconditional row."""
    return sorted({b * (2 if cfg else 1) for b in buckets})


class GraphedForward:
    """The step function for denoise_step: `step(StepBatch)` pads to a bucket and replays that bucket's graph;
    `forward(x, t, y, patch=None)` (same as calling it) is the plain forward on the same graphs.

    The model may be bf16: inputs are cast inside; timestep features, gates, outputs and the update stay fp32.
    """

    def __init__(self, model: DiT, pool: PatchPool | None, buckets=BUCKETS, cfg: bool = True,
                 compile: bool = False, autotune: bool = False, warm_compositions: bool = True):
        self.model, self.pool = model, pool
        self.rows = row_buckets(buckets, cfg)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.use_graphs = self.device.type == "cuda"
        self.compile = compile
        self.autotune = autotune  # CPU compiles: Inductor picks each GEMM's kernel by timing (CPU_AUTOTUNE)
        self.warm_compositions = warm_compositions  # warm-up makes the MIX_WIDTH graphs too
        # variant -> this base's compiled step for that bucket and variant
        self.step_fns: dict[Variant, Callable[..., tuple]] = {}
        # variant -> (CUDAGraph or None, static StepBatch, static outputs)
        self.graphs: dict[Variant, tuple] = {}
        self.padding: dict[tuple[int, int], StepBatch] = {}  # (rows, width) -> padding values of those buffers
        self.filled: dict[int, dict[str, torch.Tensor | None]] = {}  # id(buffers) -> field -> what was copied in
        self.mempool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.fallbacks = 0  # steps that ran eagerly (no bucket fits, or a module patch)
        self.replays = 0
        self.captures = 0
        cfg_ = model.config
        self.in_channels = cfg_.in_channels
        self.x_shape = (cfg_.in_channels, cfg_.input_size, cfg_.input_size)
        self.y_dtype = torch.float32 if cfg_.task == "text" else torch.long
        self.safe_coef = SAFE_COEF[:, None].to(self.device)  # (K, 1): padding images keep their latents
        self.held_tensors: list[torch.Tensor] = []
        self.held: list = []  # C++ references to what compiled CPU graphs take (hold_cpp_refs), dropped with self
        weakref.finalize(self, release_cpp_refs, self.held).atexit = False  # at exit the process frees them

    # ---------------------------------------------------------------- the step
    def _denoise(self, x, t, y, slots, scales, top_k: bool = True) -> torch.Tensor:
        patch = self.pool.batch(slots, scales, top_k=top_k) if self.pool is not None else None  # None: no patch
        return self.model(x.to(self.dtype), t, y, patch=patch).float()  # (R, C_out, H, W)

    def _step_on(self, *tensors):
        """run_step on StepBatch fields given positionally (what a graph captures or Inductor compiles)."""
        return run_step(self._denoise, StepBatch(*tensors), self.in_channels)

    def _step_on_all_prompts(self, *tensors):
        """_step_on for batches whose patches all keep every prompt: the same gates without the ranking."""
        return run_step(functools.partial(self._denoise, top_k=False), StepBatch(*tensors), self.in_channels)

    def _run(self, batch: StepBatch, top_k: bool):
        args = [getattr(batch, name) for name in STEP_FIELDS]
        if not self.compile:
            return (self._step_on if top_k else self._step_on_all_prompts)(*args)
        key = (batch.t.shape[0], top_k, batch.slots.shape[1])
        if key in self.step_fns:  # compiled: no guards, no recompile, and no config context (~5 % of a batch-1
            return self.step_fns[key](*args)  # step's Python)
        loaded = len(PyCodeCache.modules)
        try:
            with self._compile_context(key[0]):  # the first call compiles, frozen, with the chosen attention
                out = self._compiled_step(key)(*args)
        except BaseException:
            self.step_fns.pop(key, None)  # a failed compile is retried in the context, not outside
            raise
        if self.device.type == "cpu":
            self._hold_graph_tensors(args, PyCodeCache.modules[loaded:])
        return out

    def _hold_graph_tensors(self, args: list, modules: list) -> None:
        """C++ references to what a new compiled CPU graph takes: its buffers, the pool's tensors and the frozen
        constants of the modules its compile loaded (module globals), so a call never re-takes the GIL."""
        pool = [v for v in vars(self.pool).values() if isinstance(v, torch.Tensor)] if self.pool is not None else []
        constants = [v for m in modules for v in vars(m).values() if isinstance(v, torch.Tensor)]
        known = {id(t) for t in self.held_tensors}
        new = [t for t in [a for a in args if isinstance(a, torch.Tensor)] + pool + constants if id(t) not in known]
        self.held_tensors += new
        self.held += hold_cpp_refs(new)

    def _compiled_step(self, key: Variant):
        """This base's compiled step for one bucket and variant, made on first use.

        Dynamo keeps compiled graphs per *code object*, and freezing folds this base's weights into them. So each
        (base, bucket) compiles its own copy of `_step_on` with its own code object: that cache is reachable from
        this callable only, which is what ties a graph to its base (with the guards dropped below, two same-shape
        bases sharing one code object would share graphs, and with guards all bases' buckets together would hit
        dynamo's recompile limit). fullgraph: a graph break would compile the rest in frames of shared code
        (DiT.forward, ...) without guards.
        """
        if key not in self.step_fns:
            if not self.use_graphs:
                cpu_attention.load()  # built before tracing: a trace never builds it, so would leave it out
            rows, top_k, width = key
            name = f"step_{id(self):x}_{rows}_{'top_k' if top_k else 'all'}_w{width}"
            func = GraphedForward._step_on if top_k else GraphedForward._step_on_all_prompts
            code = func.__code__.replace(co_name=name, co_qualname=name)
            own = types.MethodType(types.FunctionType(code, func.__globals__, name), self)
            # No guards: they would protect nothing and cost every call. Freezing folds the weights into this
            # callable's graphs and no other base calls it (guards on the parameters: ~0.3 ms a call), and _run
            # gives it this variant's static buffers and the pool's fixed-address tensors only, the same tensors
            # every call (their tensor guards cost 1.1-1.9 % of a batch-1 step on a Zen 4 core, two runs;
            # bench/results/2026-12-08-cpu-step-guards-epyc-adhoc.log).
            self.step_fns[key] = torch.compile(own, dynamic=False, fullgraph=True, options={
                "guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
        return self.step_fns[key]

    @contextlib.contextmanager
    def _compile_context(self, rows: int):
        """Freezing must be on when Inductor compiles (torch.compile's options= does not reach it). CPU only:
        the C++ wrapper calls the kernels without a Python frame per op (~0.5 ms a forward at the demo size;
        on CUDA the graph replay has no Python at all), and the attention kernel cpu_attention picks."""
        if self.use_graphs:
            with inductor_config.patch(freezing=True):
                yield
            return
        options = {"freezing": True, "cpp_wrapper": True} | (CPU_AUTOTUNE if self.autotune else {})
        with inductor_config.patch(options), sdpa_kernel([self.cpu_attention(rows)]):
            yield

    def cpu_attention(self, rows: int) -> SDPBackend:
        """SDPA's kernel where app/model/cpu_attention.py's does not apply (other shapes, or it is off).
        bf16 weights: the flash kernel at every bucket (AMX Xeon, autotuned step, 1 thread: 2 / 4 / 8 rows
        2-3 / 2 / 4-5 % cheaper than math in two runs, 16 / 32 rows 6 / 13 %;
        bench/results/2026-12-06-cpu-attention-small-rows-autotune.log and ...-math-vs-flash-autotune.log).
        fp32 keeps the earlier rule, not measured again: math attention (Inductor's
        bmm-softmax-bmm) while a block's fp32 scores (rows, heads, N, N) fit in CPU_MATH_ATTENTION_BYTES, flash
        above, which tiles the scores that math writes out whole (before autotuning, demo base, 1 thread: a Zen 4 32
        rows (2 MiB) 16 % cheaper with flash, 16 rows even; bench/results/2026-12-06-cpu-attention-1mib.log)."""
        if self.dtype == torch.bfloat16:
            return SDPBackend.FLASH_ATTENTION
        cfg = self.model.config
        scores = rows * cfg.num_heads * cfg.num_tokens ** 2 * 4
        return SDPBackend.MATH if scores < CPU_MATH_ATTENTION_BYTES else SDPBackend.FLASH_ATTENTION

    # ---------------------------------------------------------------- buffers
    def _static_batch(self, rows: int, width: int) -> StepBatch:
        """Padding-valued buffers of one bucket and width (images are padded to as many as rows); keeps a pristine
        copy."""
        self.padding.setdefault((rows, width), self._padding(rows, width))
        buf = self._padding(rows, width)
        self.filled[id(buf)] = {}  # buffers live as long as this object: their ids are not reused
        return buf

    def _padding(self, rows: int, width: int) -> StepBatch:
        """Padding rows: image 0, t = 0, the null condition, (slot 0, scale 0) pairs; padding images: zero latents,
        prev = x."""
        d = self.device
        return StepBatch(
            x=torch.zeros(rows, *self.x_shape, device=d), row_image=torch.zeros(rows, dtype=torch.long, device=d),
            t=torch.zeros(rows, device=d), y=self.model.null_y(rows, d).to(self.y_dtype).clone(),
            slots=torch.zeros(rows, width, dtype=torch.long, device=d),
            patch_scales=torch.zeros(rows, width, device=d), cond=torch.zeros(rows, dtype=torch.long, device=d),
            uncond=torch.zeros(rows, dtype=torch.long, device=d), scale=torch.ones(rows, device=d),
            guided=torch.ones(rows, self.in_channels, dtype=torch.bool, device=d),
            coef=self.safe_coef.repeat(1, rows), noise=torch.zeros(rows, *self.x_shape, device=d))

    def _fill(self, buf: StepBatch, b: StepBatch) -> None:
        """Copy a batch into the first rows/images of the static buffers; the rest go back to padding values. A field
        whose tensor is the one copied in last time (a JobsLayout's, kept while the batch keeps its jobs; or no
        noise again) is there already."""
        R, B = b.t.shape[0], b.x.shape[0]
        pad, filled = self.padding[buf.t.shape[0], buf.slots.shape[1]], self.filled[id(buf)]
        for name in STEP_FIELDS:
            dst, src, blank = getattr(buf, name), getattr(b, name), getattr(pad, name)
            if name in filled and filled[name] is src:
                continue
            filled[name] = src
            if name == "coef":  # (K, B): images along dim 1
                dst, src, blank = dst.T, src.T, blank.T
            if src is None:  # no noise this step
                dst.copy_(blank)
                continue
            n = R if name in ROW_FIELDS else B
            dst[:n].copy_(src)
            if n < dst.shape[0]:  # a full bucket has no padding to restore (each empty copy is a dispatch)
                dst[n:].copy_(blank[n:])

    # ---------------------------------------------------------------- capture
    @torch.no_grad()
    def capture(self, rows: list[int] | None = None, warmup: int = 2, progress: str | None = None,
                top_k: bool | None = None, widths: tuple[int, ...] | None = None) -> None:
        """Warm up and capture one graph per bucket and variant (largest bucket first, so smaller ones reuse its
        memory); `progress`: a progress-bar label (compiling every CPU bucket takes minutes). `top_k`: one ranking
        variant; None takes the one without ranking, and the ranking one too while the pool holds a patch that
        needs it. `widths`: pairs per row; None takes 1, and MIX_WIDTH too with `warm_compositions` and a pool."""
        from tqdm.auto import tqdm

        if top_k is None:
            ranking = (False, True) if self.pool is not None and self.pool.selecting else (False,)
        else:
            ranking = (top_k,)
        if widths is None:
            widths = (1, MIX_WIDTH) if self.warm_compositions and self.pool is not None else (1,)
        todo = [(r, v, w) for r in sorted(rows or self.rows, reverse=True) for w in widths for v in ranking]
        bar = tqdm(todo, desc=progress, unit="graph", disable=progress is None, leave=False)
        if not self.use_graphs:
            for key in bar:  # CPU: warm (and compile) each bucket shape once
                self._ensure_cpu_bucket(key)
            return
        for key in bar:
            if key in self.graphs:
                continue
            r, v, w = key
            buf = self._static_batch(r, w)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture: torch.compile, Triton JIT, cuBLAS, allocator
                for _ in range(warmup):
                    self._run(buf, v)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                out = self._run(buf, v)
            self.graphs[key] = (graph, buf, out)
            self.captures += 1
        torch.cuda.synchronize()

    def _ensure_cpu_bucket(self, key: Variant) -> None:
        if key not in self.graphs:
            rows, top_k, width = key
            buf = self._static_batch(rows, width)
            self.graphs[key] = (None, buf, None)
            if self.compile:
                with torch.no_grad():
                    self._run(buf, top_k)

    def bucket_for(self, rows: int) -> int | None:
        return next((r for r in self.rows if r >= rows), None)

    # ---------------------------------------------------------------- calls
    @torch.no_grad()
    def step(self, b: StepBatch):
        """run_step for this batch, padded into a bucket's graph: (out (R, ...), prev (B, ...), eps, v)."""
        R, B = b.t.shape[0], b.x.shape[0]
        bucket = self.bucket_for(R)
        top_k = self.pool is not None and self.pool.needs_top_k(b.slots)
        if bucket is None:
            return self._fallback(b, top_k)
        key = (bucket, top_k, b.slots.shape[1])
        if self.use_graphs and key not in self.graphs and any(k[0] == bucket for k in self.graphs):
            # the first batch of a warmed-up bucket with a top-k patch, or composing without warm_compositions
            self.capture([bucket], top_k=top_k, widths=(key[2],))
        if self.use_graphs and key not in self.graphs:
            return self._fallback(b, top_k)
        if not self.use_graphs:
            self._ensure_cpu_bucket(key)
        graph, buf, out = self.graphs[key]
        self._fill(buf, b)
        if graph is None:  # a compiled (or eager) CPU step returns new tensors every call: views of them stay valid
            o, prev, eps, v = self._run(buf, top_k)
            return o[:R], prev[:B], eps[:B], v[:B] if v is not None else None
        graph.replay()
        self.replays += 1
        o, prev, eps, v = out  # the graph's static outputs, which the next replay overwrites
        return o[:R].clone(), prev[:B].clone(), eps[:B].clone(), v[:B].clone() if v is not None else None

    def _fallback(self, b: StepBatch, top_k: bool):
        """run_step eagerly, counted: no bucket fits, or a GPU bucket was never captured."""
        self.fallbacks += 1
        return run_step(functools.partial(self._denoise, top_k=top_k), b, self.in_channels)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, patch=None) -> torch.Tensor:
        """Plain forward (x (R, C, H, W) fp32, t (R,), y) -> fp32 (R, C_out, H, W) through the step graphs."""
        n = x.shape[0]
        if patch is None:
            slots = torch.zeros(n, 1, dtype=torch.long, device=x.device)
            scales = torch.zeros(n, 1, device=x.device)
        elif isinstance(patch, PooledPatch):
            if patch.pool is not self.pool:
                raise ValueError("this PooledPatch indexes another pool than the one these graphs read")
            slots, scales = mix_rows(patch.slots, patch.scales, mix_width([patch.slots.shape[1]]))  # a graph width
        else:  # a patch module: no graph takes it
            self.fallbacks += 1
            return self.model(x.to(self.dtype), t, y, patch=patch).float()
        rows = torch.arange(n, device=x.device)
        batch = StepBatch(x=x, row_image=rows, t=t, y=y, slots=slots, patch_scales=scales, cond=rows,
                          uncond=rows,
                          scale=torch.ones(n, device=x.device),
                          guided=torch.ones(n, self.in_channels, dtype=torch.bool, device=x.device),
                          coef=self.safe_coef.expand(-1, n), noise=None)
        return self.step(batch)[0]

    forward = __call__

    def stats(self) -> dict[str, int]:
        ready = len(self.graphs) if self.use_graphs or self.compile else 0
        return {"graphs": ready, "captures": self.captures,
                "replays": self.replays, "fallbacks": self.fallbacks}
