"""Service settings: one pydantic-settings class, read from `DMP_*` environment variables.

The only other environment reads: DMP_DATA_CACHE (the trainer's dataset cache, app/trainer/data.py),
TRITON_INTERPRET (Triton's CPU interpreter, app/model/kernels.py); app/model/text.py sets HF_HUB_OFFLINE.
"""
from __future__ import annotations

import base64
import os
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.apikeys import KeyRing

MIN_ADMIN_TOKEN_CHARS = 16
# Every admin token the docs or deploy files ever showed as an example: public, so never accepted.
EXAMPLE_ADMIN_TOKENS = frozenset({"s3cret", "secret", "replace-me-at-deploy-time", "change-me", "changeme"})


class Settings(BaseSettings):
    """Every knob of the service; see docs/service.md for the table."""

    model_config = SettingsConfigDict(env_prefix="DMP_", extra="ignore")

    admin_token: SecretStr | None = Field(None, description="Bearer token for PUT/DELETE /patches; unset = off")
    key_id_secret: SecretStr | None = Field(None, description="HMAC key naming API keys without an id in metrics and "
                                            "rate-limit buckets, the same on every replica; unset = derived from "
                                            "DMP_API_KEYS")
    api_keys: SecretStr | None = Field(None, description="Keys for /generate, /v1/* and the gates routes: a file "
                                       "or a comma list of entries KEY | sha256:HEX | ID:KEY | ID:sha256:HEX, "
                                       "ID as ID[@TENANT][+admin]; unset = open")
    key_requests_per_min: float = Field(0, ge=0, description="Requests a key may make per minute; 0 = no limit")
    key_images_per_min: float = Field(0, ge=0, description="Images a key may ask for per minute; 0 = no limit")
    tenant_requests_per_min: float = Field(0, ge=0, description="Requests all keys of a tenant may make per minute "
                                           "together; 0 = no limit")
    tenant_images_per_min: float = Field(0, ge=0, description="Images all keys of a tenant may ask for per minute "
                                         "together; 0 = no limit")
    metrics_token: SecretStr | None = Field(None, description="Bearer token that reads /metrics (as does the admin "
                                            "token); needed there whenever set or DMP_API_KEYS is set")
    redis_url: str | None = Field(None, description="Redis for shared patches and the result cache; unset = disk")
    model_dir: Path = Field(Path("models"), description="Base checkpoints served (*.safetensors, *.pt, folders)")
    patch_dir: Path | None = Field(None, description="Patch files: the embedded registry serves them and writes "
                                   "uploads here; with Redis they seed an empty Redis once. Unset: "
                                   "$XDG_DATA_HOME/dmp/patches (~/.local/share/dmp/patches), filled once per name from "
                                   "DMP_SHIPPED_PATCH_DIR; with Redis, DMP_SHIPPED_PATCH_DIR itself")
    shipped_patch_dir: Path = Field(Path("patches"), description="The demo patches shipped with the project: only "
                                    "read, never written")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto: CUDA when available, else CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: fp32 CPU, bf16 CUDA")
    cuda_graphs: bool = Field(True, description="On CUDA: bucketed CUDA-graph step (app/engine/graphs.py)")
    fused_kernels: bool = Field(True, description="On CUDA: Triton kernels fusing the residual and DMP prompt adds "
                                                  "with LayerNorm + modulate; false = plain torch ops")
    cuda_compile: bool = Field(False, description="On CUDA with graphs: torch.compile each bucket's step before "
                                                  "capture (minutes at start); not yet measured on a GPU")
    cpu_compile: bool = Field(False, description="On CPU: one torch.compile'd step per batch bucket, compiled at "
                                                 "start (~10-30 s a bucket); pair with DMP_DTYPE=bfloat16")
    cpu_autotune: bool = Field(True, description="With DMP_CPU_COMPILE: Inductor times each of a bucket's GEMMs "
                                                 "in oneDNN and in its own C++ template (AMX / AVX-512 micro-"
                                                 "kernels) and keeps the faster (2-5x the compile time)")
    warm_compositions: bool = Field(True, description="With compiled CPU steps or CUDA graphs: warm-up also makes "
                                                      "each bucket's graph for batches that compose patches (one "
                                                      "pair per row is a graph of its own, cheaper per step); "
                                                      "false = half the compiling at start, and a bucket's first "
                                                      "composing batch compiles its graph while every request waits")
    cpu_attention_kernel: bool = Field(True, description="On CPU: inference attention at the shapes it takes (the "
                                                         "demo bases: 64 tokens, head dim 16) runs this project's "
                                                         "C++ kernel (app/model/cpu_attention.py), built once per "
                                                         "machine at start (~10 s); false = torch's SDPA")
    cpu_malloc_keep: bool = Field(True, description="On CPU (glibc): freed tensor memory stays in the process for the "
                                                    "next step instead of faulting back in page by page "
                                                    "(app/engine/allocator.py); resident memory stays near its peak")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default (all cores)")
    cpu_bind: bool = Field(False, description="On CPU with DMP_TORCH_THREADS below the cores available: the runner "
                                              "thread (and its torch threads) on the last DMP_TORCH_THREADS cores, "
                                              "the server's other threads on the rest")
    max_queue: int = Field(64, ge=1, description="Requests admitted at once (waiting + running); beyond: 429")
    max_batch: int = Field(16, ge=1, description="Images per batched forward (before CFG doubling)")
    scheduler: Literal["deadline", "fair"] = Field("deadline", description="deadline: refuse (429 "
                                                   "deadline_unreachable) a request the measured step times say "
                                                   "cannot finish before its deadline, run small requests fewest "
                                                   "steps left first and large ones earliest deadline first; fair: "
                                                   "admit up to DMP_MAX_QUEUE and advance every request together "
                                                   "(least steps done first)")
    max_background: int = Field(256, ge=0, description="Background (batch) requests admitted at once, counted apart "
                                                       "from DMP_MAX_QUEUE; beyond: 429 background_full")
    background_timeout: float = Field(86400.0, gt=0, description="Seconds a background request may take end to "
                                                                 "end (it yields to interactive ones)")
    background_slowdown: float = Field(0.0, ge=0, description="How much slower (fraction of its measured time) "
                                                              "background rows may make an interactive step they "
                                                              "join; 0 = they run only in steps of their own (it "
                                                              "adds up over a request's steps: 0.1 x 20 steps = 2)")
    background_step: float = Field(1.0, ge=1, description="A step of background rows alone lasts at most this many "
                                                          "1-image steps (measured), so an interactive request "
                                                          "arriving during it waits at most that long; higher = more "
                                                          "batch throughput on an otherwise idle replica")
    background_grace: float = Field(0.02, ge=0, le=10, description="Seconds background steps wait after an "
                                                                   "interactive request is answered: its response "
                                                                   "goes out, and the same client's next request "
                                                                   "comes in, with no batch step in between")
    patch_slots: int = Field(16, ge=2, description="Device patch slots per base (slot 0 = the base itself): an LRU "
                                                   "cache; any number of patches can be stored")
    patch_host_bytes: int = Field(2 * 1024 ** 3, ge=0, description="Host-memory cache of validated patches, bytes "
                                                                  "(pinned on CUDA); beyond it they are re-read from "
                                                                  "the store on use")
    patch_tombstone_seconds: int = Field(7 * 86400, ge=1, description="How long a deleted patch name's tombstone "
                                         "(Redis key and each replica's memory) stops a refill from bringing it back")
    patch_public_keys: str | None = Field(None, description="PEM public keys (comma-separated paths): when set, "
                                          "every patch must carry a valid model-signing signature by one of them")
    request_timeout: float = Field(120.0, gt=0, description="Seconds a request may take end to end")
    drain_seconds: float = Field(30.0, ge=0, description="On SIGTERM: seconds to finish in-flight requests")
    max_patch_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Upload cap, counted on received bytes")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Body cap of every other route (JSON requests are "
                                                                 "a few hundred bytes), counted on received bytes")
    max_steps: int = Field(1000, ge=1, description="Largest `steps` a request may ask for")
    max_images: int = Field(8, ge=1, description="Largest `num_images` per request")
    max_cost: int = Field(8000, ge=1, description="Largest `steps * num_images` per request (its denoising work); "
                                                  "beyond: 422 cost_too_high")
    max_caption_chars: int = Field(1000, ge=1)
    gate_max_values: int = Field(65536, ge=16, description="Largest gate map (blocks x timesteps x prompts values) "
                                                         "/patches/{name}/gates computes; beyond: 422")
    gate_cache_bytes: int = Field(32 * 1024 ** 2, ge=0, description="Bytes of computed gate maps (JSON, weights, "
                                                                    "PNGs) kept per replica; 0 = no cache")
    cache_ttl: int = Field(0, ge=0, description="Seconds a result stays in the Redis cache; 0 = off")
    cache_secret: SecretStr | None = Field(None, description="HMAC key of result-cache entries, the same on every "
                                                             "replica; unset = a random key per process")
    redis_timeout: float = Field(1.0, gt=0, description="Socket timeout for every Redis call")
    retry_after: int = Field(1, ge=1, description="Retry-After seconds sent with 429 and 503")
    batch_dir: Path | None = Field(None, description="Batch API files and batches without Redis; unset = "
                                   "~/.cache/dmp/batch (created on first use)")
    batch_max_file_bytes: int = Field(16 * 1024 ** 2, ge=1024, description="POST /v1/files upload cap (its own "
                                      "body cap, counted on received bytes)")
    batch_max_lines: int = Field(10000, ge=1, description="Lines (requests) per batch input file")
    batch_ttl: int = Field(7 * 86400, ge=60, description="Seconds files and finished batches are kept")
    batch_inflight: int = Field(2, ge=1, description="Batch lines each replica runs at once (admitted under "
                                "DMP_MAX_BACKGROUND, at the batcher's background priority)")
    batch_reclaim_idle: float = Field(30.0, gt=0, description="With Redis: seconds a line may sit unacknowledged "
                                      "by a silent replica before another reclaims it (live replicas refresh theirs)")
    webhook_secret: SecretStr | None = Field(None, description="Standard Webhooks secret `whsec_<base64>` signing "
                                             "batch events")
    webhook_url: str | None = Field(None, description="http(s) URL that receives signed batch.* events; unset = off")
    webhook_attempts: int = Field(6, ge=1, description="Delivery attempts per event (backoff 1, 2, 4, ... s)")
    webhook_timeout: float = Field(5.0, gt=0, description="Seconds per webhook delivery attempt")
    warmup: bool = Field(True, description="Run one tiny generation per base before reporting ready")
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line, with the "
                                                "request id on every line logged while serving a request")

    @field_validator("admin_token", "metrics_token")
    @classmethod
    def _token_is_not_guessable(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None:
            return None
        value = token.get_secret_value()
        if len(value) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"must be at least {MIN_ADMIN_TOKEN_CHARS} characters (got {len(value)}); "
                             "generate one with `openssl rand -hex 32`")
        if value in EXAMPLE_ADMIN_TOKENS:
            raise ValueError("is an example value from the docs, known to anyone: generate one with "
                             "`openssl rand -hex 32`")
        return token

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_is_standard(cls, secret: SecretStr | None) -> SecretStr | None:
        """A secret receivers cannot use would sign every event in vain: refuse to start instead."""
        if secret is not None:
            value = secret.get_secret_value()
            try:
                key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
            except ValueError:
                key = b""
            if not value.startswith("whsec_") or len(key) < 24:
                raise ValueError("must be whsec_ followed by base64 of at least 24 random bytes; generate one with "
                                 "`echo whsec_$(openssl rand -base64 32)`")
        return secret

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url_is_http(cls, url: str | None, info: ValidationInfo) -> str | None:
        """Only http(s) with a host: no file:, gopher: or other scheme is ever fetched."""
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if info.data.get("webhook_secret") is None:
            raise ValueError("needs DMP_WEBHOOK_SECRET: events are always signed")
        return url

    @field_validator("patch_public_keys")
    @classmethod
    def _public_keys_load(cls, paths: str | None) -> str | None:
        """A key that cannot be read would refuse every patch at run time: refuse to start instead."""
        from app.core.signing import PatchVerifier

        if paths is not None:
            PatchVerifier([p.strip() for p in paths.split(",") if p.strip()])  # raises ValueError naming the file
        return paths

    @property
    def patch_root(self) -> Path:
        """The patch directory in use: DMP_PATCH_DIR, else the user data one (embedded) or the shipped one (Redis)."""
        if self.patch_dir is not None:
            return self.patch_dir
        if self.redis_url:
            return self.shipped_patch_dir
        return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "dmp" / "patches"

    @property
    def patch_seed_dir(self) -> Path | None:
        """Where the default user patch directory is filled from (once per name); None when DMP_PATCH_DIR is set."""
        return self.shipped_patch_dir if self.patch_dir is None and not self.redis_url else None

    @property
    def public_key_paths(self) -> list[str]:
        return [p.strip() for p in (self.patch_public_keys or "").split(",") if p.strip()]

    @field_validator("key_id_secret")
    @classmethod
    def _key_id_secret_is_not_guessable(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"must be at least {MIN_ADMIN_TOKEN_CHARS} characters; generate one with "
                             "`openssl rand -hex 32`")
        return secret

    @field_validator("api_keys")
    @classmethod
    def _api_keys_parse(cls, keys: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        """A bad key list stops the start with one line (KeyGate parses it again to serve)."""
        if keys is not None:
            KeyRing.parse(keys.get_secret_value(), id_secret_bytes(info.data.get("key_id_secret")))
        return keys

    @property
    def batch_root(self) -> Path:
        """Where the embedded Batch API keeps its files: never inside the repository by default."""
        return self.batch_dir or Path.home() / ".cache" / "dmp" / "batch"

    @cached_property
    def torch_device(self) -> str:
        from app.core.devices import pick_device

        return pick_device(self.device)

    @cached_property
    def torch_dtype(self):
        from app.core.devices import pick_dtype

        return pick_dtype(self.dtype, self.torch_device)


def id_secret_bytes(secret: SecretStr | None) -> bytes | None:
    """DMP_KEY_ID_SECRET as the HMAC key KeyRing takes."""
    return secret.get_secret_value().encode() if secret else None


def describe_errors(error: ValidationError) -> str:
    """One line per bad setting, named as its variable, without echoing the value (it may be a secret)."""
    return "; ".join(f"DMP_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors())
