"""Prometheus metrics of one app instance, in their own CollectorRegistry (so tests can build many apps)."""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
OCCUPANCY_BUCKETS = (0.125, 0.25, 0.5, 0.75, 1.0)
SWAP_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """All service metrics; names start with `dmp_`."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        GCCollector(registry=r)  # python_gc_*: full collections stall the runner (docs/design.md, Runtime shape)
        self.requests = Counter("dmp_requests", "HTTP requests", ["route", "method", "status", "error_type"],
                                registry=r)
        self.request_seconds = Histogram("dmp_request_seconds", "HTTP latency by route", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        stage = dict(labelnames=["model", "patch"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("dmp_queue_seconds", "Admission to first denoising step", **stage)
        self.sample_seconds = Histogram("dmp_sample_seconds", "First to last denoising step", **stage)
        self.decode_seconds = Histogram("dmp_decode_seconds", "VAE decode and image encoding", **stage)
        self.total_seconds = Histogram("dmp_generate_seconds", "Admission to reply", **stage)
        self.queue_depth = Gauge("dmp_queue_depth", "Requests admitted but not yet running", registry=r)
        self.inflight = Gauge("dmp_inflight", "Requests admitted and not finished", registry=r)
        self.max_queue = Gauge("dmp_max_queue", "DMP_MAX_QUEUE: admitted requests beyond which /generate answers 429",
                               registry=r)
        self.admission_stretch = Gauge("dmp_admission_stretch", "Admitted requests' time to finish over what the "
                                       "admission replay gave them (moving average; 1 = the replay was right)",
                                       registry=r)
        self.batch_size = Histogram("dmp_batch_size", "Images per batched forward", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_occupancy = Histogram("dmp_batch_occupancy", "Batch images / DMP_MAX_BATCH", ["model"],
                                         buckets=OCCUPANCY_BUCKETS, registry=r)
        self.images = Counter("dmp_images_generated", "Images generated (cache hits excluded)", ["model", "patch"],
                              registry=r)
        self.images_cached = Counter("dmp_images_cached", "Images answered from the result cache, not generated",
                                     ["model", "patch"], registry=r)
        self.dropped = Counter("dmp_requests_dropped", "Admitted work dropped before the end", ["reason"],
                               registry=r)
        self.patch_swaps = Counter("dmp_patch_swaps", "Patch versions installed over an older one", ["model"],
                                   registry=r)
        self.patch_installs = Counter("dmp_patch_installs", "Patch versions installed", ["model"], registry=r)
        self.patch_refusals = Counter("dmp_patch_refusals", "Patch uploads or loads refused", ["reason"],
                                      registry=r)
        self.slots_in_use = Gauge("dmp_patch_slots_in_use", "Pool slots holding a patch version (slot 0 excluded)",
                                  ["model"], registry=r)
        self.versions_held = Gauge("dmp_patch_versions_held", "Retired versions still pinned by requests",
                                   ["model"], registry=r)
        # per-patch series: resident only while in a slot (<= DMP_PATCH_SLOTS per base); swap-ins and evictions
        # once per patch that ever moved on this replica, removed on DELETE; the latency histogram per base only
        self.patch_resident = Gauge("dmp_patch_resident", "Versions of a patch in device slots (no series when "
                                    "none)", ["model", "patch"], registry=r)
        self.patch_swap_ins = Counter("dmp_patch_swap_ins", "Copies of a patch into a device slot", ["model", "patch"],
                                      registry=r)
        self.patch_evictions = Counter("dmp_patch_evictions", "A patch's slot reused for another patch",
                                       ["model", "patch"], registry=r)
        self.patch_swap_in_seconds = Histogram("dmp_patch_swap_in_seconds", "Patch load time: source=store (read "
                                               "and validate into host memory) or host (copy into a device slot)",
                                               ["model", "source"], buckets=SWAP_BUCKETS, registry=r)
        self.patch_host_bytes = Gauge("dmp_patch_host_bytes", "Bytes of patch copies held in host memory", ["model"],
                                      registry=r)
        self.cache = Counter("dmp_result_cache", "Result cache lookups", ["outcome"], registry=r)
        self.key_requests = Counter("dmp_api_key_requests", "Generation requests by API key id (never the key)",
                                    ["key", "outcome"], registry=r)
        self.key_images = Counter("dmp_api_key_images", "Images asked for by API key id", ["key"], registry=r)
        self.tenant_requests = Counter("dmp_tenant_requests", "Generation requests by tenant (all its keys)",
                                       ["tenant", "outcome"], registry=r)
        self.tenant_images = Counter("dmp_tenant_images", "Images asked for by tenant (all its keys)", ["tenant"],
                                     registry=r)
        self.key_refusals = Counter("dmp_api_key_refusals", "Requests refused before any key matched", ["reason"],
                                    registry=r)
        self.ready = Gauge("dmp_ready", "1 when /health/ready answers 200", registry=r)
        # the name predates DMP_CPU_COMPILE; kept so dashboards keep working
        self.graph_forwards = Gauge("dmp_cuda_graph_forwards", "Graphed-step counts: graphs (CUDA graphs or compiled "
                                    "CPU buckets), captures, replays, fallbacks = eager steps", ["model", "kind"],
                                    registry=r)
        self.fused_kernels = Gauge("dmp_fused_kernels", "1 when the blocks run the fused Triton kernel (CUDA); 0 on "
                                   "plain torch (CPU, DMP_FUSED_KERNELS=false, or a failed start-up self-check)",
                                   registry=r)
        self.cpu_attention_kernel = Gauge("dmp_cpu_attention_kernel", "1 when CPU attention at the served shapes "
                                          "runs the project's C++ kernel; 0 on torch's SDPA (GPU, "
                                          "DMP_CPU_ATTENTION_KERNEL=false, other shapes, or no build: see the log)",
                                          registry=r)
        self.device_memory = Gauge("dmp_device_memory_bytes", "Accelerator memory", ["device", "kind"], registry=r)
        # the Batch API: queued/running and the oldest line's age from the queue (every replica reports the same
        # cluster-wide values with Redis: take max()); answers and batch ends counted by the replica that wrote them
        self.batch_lines = Gauge("dmp_batch_lines", "Batch lines not yet answered, by state (queued, running)",
                                 ["state"], registry=r)
        self.batch_oldest_seconds = Gauge("dmp_batch_oldest_pending_seconds", "Age of the oldest unanswered batch "
                                          "line (0 when none)", registry=r)
        self.batch_answered = Counter("dmp_batch_lines_answered", "Batch lines answered, by kind (completed, "
                                      "failed, expired, skipped = cancelled before it ran)", ["kind"], registry=r)
        self.batches_finished = Counter("dmp_batches_finished", "Batches that reached a final status", ["status"],
                                        registry=r)
        self.webhook_deliveries = Counter("dmp_webhook_deliveries", "Webhook delivery attempts by outcome "
                                          "(delivered, retry, failed = the last attempt failed)", ["outcome"],
                                          registry=r)

    def forget_patch(self, model: str, patch: str) -> None:
        """A deleted patch leaves no series behind (74 per patch stayed when only the slot series were removed)."""
        for metric in (self.patch_resident, self.patch_swap_ins, self.patch_evictions, self.queue_seconds,
                       self.sample_seconds, self.decode_seconds, self.total_seconds, self.images,
                       self.images_cached):
            metric.remove(model, patch)  # a no-op for a series that does not exist

    def refresh_device_memory(self, device: str) -> None:
        """CUDA allocator numbers, when the service runs on a GPU."""
        if not device.startswith("cuda"):
            return
        import torch

        self.device_memory.labels(device, "allocated").set(torch.cuda.memory_allocated())
        self.device_memory.labels(device, "reserved").set(torch.cuda.memory_reserved())

    def render(self) -> bytes:
        return generate_latest(self.registry)
