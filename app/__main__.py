"""`python -m app serve [--host H] [--port P]`, `python -m app generate ...` (same engine as the server) and
`python -m app import-dmp CKPT --base-out B --patch-out P` (official DMP checkpoints)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("dmp")


def serve(args) -> int:
    """Run until SIGTERM (exit 0); 2 on invalid settings, 1 when the engine cannot start (reason logged)."""
    import uvicorn
    from pydantic import ValidationError

    from app.api.main import create_app
    from app.core import logs
    from app.core.config import Settings, describe_errors

    try:
        settings = Settings()
    except ValidationError as e:
        logs.configure("info", "text")  # the log settings themselves may be the bad ones
        log.error("invalid settings, not starting: %s", describe_errors(e))
        return 2
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    engine = app.state.engine

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: stop admitting (503 draining), finish in-flight work, then exit; second: now."""

        draining = False
        exit_code = 0

        def handle_exit(self, sig, frame):
            if self.draining:
                return super().handle_exit(sig, frame)
            self.draining = True
            threading.Thread(target=self._drain, name="dmp-drain", daemon=True).start()

        def _drain(self):
            log.info("draining: %d request(s) in flight, up to %.0f s", engine.inflight, settings.drain_seconds)
            finished = engine.drain(settings.drain_seconds)
            if finished:
                log.info("drained")
            else:
                log.warning("drain time over; %d request(s) cut", engine.inflight)
            engine.cut()  # what is still running gets its 503 shutting_down now, not a cancelled task's 500
            self.should_exit = True

        def exit_if_start_fails(self):
            """A process that can never serve must not sit unready forever: exit 1 so the orchestrator sees it."""
            while engine.state in ("starting", "warming"):
                time.sleep(0.2)
            if engine.state == "failed":
                log.error("start failed, exiting: %s", engine.error)
                self.exit_code, self.should_exit = 1, True

    # log_config=None: uvicorn's loggers propagate to the handler logs.configure installed (same format)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=settings.log_level.lower(),
                            # drained already: just flush replies; uvicorn's hint says int, asyncio takes a float
                            log_config=None, timeout_graceful_shutdown=0.5)  # type: ignore[arg-type]
    server = DrainingServer(config)
    threading.Thread(target=server.exit_if_start_fails, name="dmp-start-watch", daemon=True).start()
    server.run()
    # Every request is answered and the engine stopped. AnyIO's idle worker threads are not daemons and would
    # hold interpreter exit for up to 10 s (seen: drain time + 6 s), so leave now, logs flushed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(server.exit_code)


def generate(args) -> int:
    """Generate through the engine (the same resolve -> open -> stream path as HTTP), loading only the base needed."""
    from app.core.config import Settings
    from app.engine.engine import Engine

    logging.basicConfig(level=logging.WARNING)
    settings = Settings(warmup=False)
    out = Path(args.out)
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(out.suffix.lower(), "png")
    engine = Engine(settings, only=args.model or _base_of_patch(settings, args.patch))
    engine.start()
    if engine.state != "ready":
        print(f"error: {engine.error or engine.readiness()[2]}", file=sys.stderr)
        return 1
    try:
        spec, done = engine.generate(model=args.model, patch=args.patch, class_label=args.class_label,
                                     caption=args.caption, num_images=args.num_images, steps=args.steps,
                                     sampler=args.sampler, guidance_scale=args.guidance, seed=args.seed,
                                     output_format=fmt)
    except Exception as e:
        print(f"error: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2
    finally:
        engine.stop()
    paths = [out] if len(done.files) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}")
                                                for i in range(len(done.files))]
    for path, data in zip(paths, done.files, strict=True):
        path.write_bytes(data)
    version = f"@{done.versions[0]}" if done.versions else ""
    print(f"wrote {', '.join(map(str, paths))}: model={spec.model} patch={spec.patch or 'none'}{version} "
          f"seed={spec.seed} steps={spec.steps} sampler={spec.sampler} sample_ms={done.timings['sample_ms']:.0f}")
    return 0


def _base_of_patch(settings, patch: str | None) -> str | None:
    """The base a patch file in DMP_PATCH_DIR names, so only that base is loaded; None: load them all."""
    from app.model.dmp import read_header

    for folder in (settings.patch_root, settings.patch_seed_dir):  # the shipped one: not copied in yet
        if patch and folder is not None:
            try:
                return read_header((folder / f"{patch}.safetensors").read_bytes()).get("__metadata__", {}).get(
                    "base_name")
            except (OSError, ValueError):  # unreadable here (PatchError is a ValueError): the engine will say why
                continue
    return None


def import_dmp(args) -> int:
    from app.model.loaders import CheckpointError
    from app.model.official import import_dmp as run

    try:
        done = run(args.ckpt, args.base_out, args.patch_out, name=args.name, domain=args.domain or "",
                   weights=args.weights, vae=args.vae, labels=args.labels, beta_schedule=args.beta_schedule,
                   num_heads=args.num_heads)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in done.notes:
        print(f"note: {note}")
    print(f"wrote base {done.base_path} and patch {done.patch_path} (from the {done.weights!r} weights)")
    return 0


def parser() -> argparse.ArgumentParser:
    from app.model.sampling import SAMPLERS

    p = argparse.ArgumentParser(prog="python -m app", description="DMP patch server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP service (settings from DMP_* variables)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=serve)
    g = sub.add_parser("generate", help="generate images through the engine, no HTTP")
    g.add_argument("--model")
    g.add_argument("--patch")
    cond = g.add_mutually_exclusive_group()
    cond.add_argument("--class-label", type=lambda v: int(v) if v.isdigit() else v, help="a number or a class name")
    cond.add_argument("--caption")
    g.add_argument("--seed", type=int, help="default: a random one (printed)")
    g.add_argument("--num-images", type=int, default=1, help="more than one: OUT-0.png, OUT-1.png, ...")
    g.add_argument("--steps", type=int)
    g.add_argument("--sampler", choices=SAMPLERS)
    g.add_argument("--guidance", type=float)
    g.add_argument("--out", required=True)
    g.set_defaults(func=generate)
    i = sub.add_parser("import-dmp", help="convert an official sangminwoo/DMP training checkpoint to a base + patch")
    i.add_argument("ckpt", help="the official train.py checkpoint (.pt with model / ema / opt / config)")
    i.add_argument("--base-out", required=True, help="our base .safetensors to write (put it in DMP_MODEL_DIR)")
    i.add_argument("--patch-out", required=True, help="our patch .safetensors to write (put it in DMP_PATCH_DIR)")
    i.add_argument("--name", help="the base's served name (default: the --base-out file name)")
    i.add_argument("--domain", help="the patch's domain (default: the checkpoint's data set name)")
    i.add_argument("--weights", choices=("ema", "model"), help="which state dict (default: ema when present)")
    i.add_argument("--vae", help="the VAE folder or Hub id to serve with (default: stabilityai/sd-vae-ft-<its vae>)")
    i.add_argument("--labels", help="class names: a JSON list or id2label file (e.g. a DiTPipeline model_index.json)")
    i.add_argument("--beta-schedule", choices=("linear", "cosine"), help="default: the checkpoint's schedule_name")
    i.add_argument("--num-heads", type=int, help="only for a non-standard width")
    i.set_defaults(func=import_dmp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
