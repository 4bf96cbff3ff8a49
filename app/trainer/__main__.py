"""`python -m app.trainer` (console script `dmp-train`): pretrain | patch | eval | compare | curve | table |
make-domain."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from app.core.signing import check_private_key, sign_file
from app.model.dmp.module import GATE_INPUTS, SELECTIONS
from app.model.sampling import SAMPLERS
from app.trainer.domains import STYLES
from app.trainer.evaluate import EVAL_SAMPLING
from app.trainer.train import TrainConfig

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
# What `patch` trains with no other flags: issue 11's recipe (gate x64, lr 1e-3, EMA 0.995), measured moving the
# shipped mnist base to thick and inverted digits (docs/results.md, "Domain shift"; ~5.5 min at 1 idle CPU thread).
# The baselines keep their own learning rates (full fine-tuning at 1e-3 diverges from the base).
RECIPES: dict[str, dict[str, Any]] = {
    "dmp": {"steps": 1000, "batch_size": 64, "lr": 1e-3, "gate_lr_mult": 1.0, "gate_scale": 64.0, "ema_decay": 0.995},
    "pt": {"steps": 1000, "batch_size": 64, "lr": 1e-3, "ema_decay": 0.995},
    "ft": {"steps": 1000, "batch_size": 64, "lr": 1e-4, "ema_decay": 0.995},
}
RECIPE_KEYS = sorted({k for r in RECIPES.values() for k in r})


def option(p: argparse.ArgumentParser, name: str, overrides: dict | None = None, **kw) -> None:
    """--name-with-dashes, its default TrainConfig's (or this command's override): each default stated once."""
    p.add_argument("--" + name.replace("_", "-"), default=(overrides or {}).get(name, DEFAULTS[name]), **kw)


def add_train_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    d = DEFAULTS | defaults
    p.add_argument("--dataset", required="dataset" not in defaults, default=d.get("dataset"),
                   help="mnist | animals | mnist-captions | digits | digits-captions | folder:PATH")
    p.add_argument("--out", required=True, help="output .safetensors (base, patch, or FT checkpoint)")
    p.add_argument("--domain", default="", help="the domain the output is for (default: the image folder's name, "
                                                "else the base's domain or the data set)")
    p.add_argument("--image-size", type=int, default=d["image_size"])
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="global batch: split over the ranks (torchrun) and the accumulation steps")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--lr-decay-steps", type=int, default=d["lr_decay_steps"],
                   help="> 0: the lr falls linearly to 0 over the last this many steps")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device", default=d["device"], help="auto | cpu | cuda")
    p.add_argument("--amp", default=d["amp"], choices=["auto", "bf16", "none"])
    p.add_argument("--hflip", default=d["hflip"], nargs="?", const="on", choices=["auto", "on", "off"],
                   help="random horizontal flips: --hflip (= on) | off | auto (the data set's choice: off for "
                        "digits and image folders, on for animals)")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"])
    p.add_argument("--eval-every", type=int, default=d["eval_every"])
    p.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this much training time")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--allow-batch-change", action="store_true",
                   help="resume a checkpoint that was trained at another global batch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads(p)


def add_extractors(p: argparse.ArgumentParser) -> None:
    from app.trainer.extractors import INDEPENDENT

    p.add_argument("--extractors", nargs="+", default=list(INDEPENDENT), choices=INDEPENDENT,
                   help="the independent extractors to score with (mobilenet: ImageNet MobileNetV2, ~30 ms an image)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and OpenMP (default: $OMP_NUM_THREADS, else every core this "
                        "process may use)")


def set_threads(threads: int | None) -> int:
    """One thread count for torch's intra-op pool and OpenMP, here and in any process this one starts."""
    import torch

    n = threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)  # also sets OpenMP's count for this process
    return n


def set_quiet() -> None:
    """No library progress bars either (ours follow `progress=False`): the Hub's downloads (of VAEs, encoders)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def config_from(args, method: str) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    if not args.domain and args.dataset.startswith("folder:"):  # a patch for a folder of thick digits is "thick"
        args.domain = Path(args.dataset.removeprefix("folder:")).resolve().name
    recipe = RECIPES.get(method, {}) if args.command == "patch" else {}
    kwargs = {k: v if v is not None else recipe.get(k) for k, v in vars(args).items() if k in names}
    return TrainConfig(method=method, **{k: v for k, v in kwargs.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmp-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a base DiT from scratch (EMA weights are saved)")
    pretrain = {"lr": 3e-4, "batch_size": 256, "ema_decay": 0.999}  # where pretraining differs from patching
    add_train_args(p, pretrain)
    option(p, "ema_decay", pretrain, type=float)
    for name in ("hidden_size", "depth", "num_heads", "patch_size"):
        option(p, name, type=int)
    option(p, "learn_sigma", action=argparse.BooleanOptionalAction)
    option(p, "beta_schedule", choices=["linear", "cosine"])
    option(p, "text_encoder")

    p = sub.add_parser("patch", help="freeze a base and train a DMP patch (or the FT / PT baselines); with no other "
                                      "flags, the recipe for a new domain (docs/trainer.md)")
    add_train_args(p, dict.fromkeys(RECIPE_KEYS))  # None: the method's recipe (RECIPES)
    p.add_argument("--base", required=True, help="base .safetensors / .pt / diffusers folder")
    p.add_argument("--baseline", choices=["ft", "pt"], help="ft: full fine-tuning; pt: gate-less prompt tuning")
    option(p, "pt_depth", type=int, help="blocks that get prompts (0 = all)")
    option(p, "gate_input", choices=GATE_INPUTS)
    option(p, "top_k", type=float, help="fraction of prompts kept (1 = soft)")
    p.add_argument("--no-noisy-gating", dest="noisy_gating", action="store_false")
    option(p, "w_importance", type=float)
    option(p, "w_load", type=float)
    option(p, "load_kind", choices=["smooth", "reference"])
    option(p, "gate_lr_mult", dict.fromkeys(RECIPE_KEYS), type=float)
    option(p, "selection", choices=SELECTIONS,
           help="with --top-k < 1: kept prompts weighted by a softmax over them (official code) or 1 (paper)")
    option(p, "gate_scale", dict.fromkeys(RECIPE_KEYS), type=float,
           help="ours, not the paper's: gates x this in training (num_tokens: uniform gate = PT at init)")
    option(p, "freeze_gate", action="store_true", help="control: the gate stays uniform, only the prompts train")
    option(p, "shuffle_gate_t", action="store_true",
           help="control: in training the gate sees another row's timestep (its class kept)")
    option(p, "ema_decay", dict.fromkeys(RECIPE_KEYS), type=float,
           help="> 0: save an EMA of the trained weights (patch or FT model) instead of the raw ones")
    option(p, "text_encoder")
    p.add_argument("--sign-key", type=Path, default=None,
                   help="EC private key (PEM): also write OUT.sig, a model-signing bundle (docs/service.md)")

    p = sub.add_parser("eval", help="score a base (and paired, base + patch) against held-out images of a data set")
    p.add_argument("--base", required=True)
    p.add_argument("--patch", default=None)
    p.add_argument("--dataset", default=None,
                   help="mnist | animals | ... | folder:PATH (any channels and size: read as the base sees it); "
                        "defaults to the data set recorded in the base")
    p.add_argument("--num-samples", type=int, default=0, help="0 = one per held-out image")
    p.add_argument("--sampler", default=EVAL_SAMPLING["sampler"], choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=EVAL_SAMPLING["steps"])
    p.add_argument("--guidance-scale", type=float, default=EVAL_SAMPLING["guidance_scale"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--heldout", action="store_true",
                   help="also the held-out loss per timestep decile (fixed noise), paired patched vs base")
    p.add_argument("--classifier-steps", type=int, default=0,
                   help="> 0, bundled data sets only: add our classifier's column (trained on the generators' data; "
                        "this many steps if not cached) and class accuracy")
    add_extractors(p)

    p = sub.add_parser("compare", help="paired comparison of a base with patches / FT models over sampling seeds")
    p.add_argument("--base", required=True)
    p.add_argument("--arm", action="append", default=[], metavar="LABEL=FILE[,FILE...]",
                   help="a patch or an FT model; several files = training runs (seeds) of one recipe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--dataset", default=None,
                   help="score against this data set's held-out part (folder:PATH too); default: the base's")
    p.add_argument("--sampler", default=EVAL_SAMPLING["sampler"], choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=EVAL_SAMPLING["steps"])
    p.add_argument("--guidance-scale", type=float, default=EVAL_SAMPLING["guidance_scale"])
    p.add_argument("--cache", default="runs/compare", help="sampled features per arm and seed")
    p.add_argument("--boots", type=int, default=100, help="bootstrap draws for the SE of a paired difference")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out loss per timestep decile")
    p.add_argument("--seed-per-run", action="store_true",
                   help="sample an arm's i-th training run at the i-th seed only (one pass per run)")
    add_extractors(p)
    p.add_argument("--versus", default=None, metavar="LABEL",
                   help="also each arm minus this arm, paired run by run (e.g. the gate's share: DMP minus PT)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="also write the paired table here")

    p = sub.add_parser("study", help="the pre-registered FT / PT / DMP study of docs/results.md (resumable)")
    p.add_argument("--base", default="models/mnist.safetensors")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--runs", default="runs/study", help="trained files, samples and one result JSON per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arm", action="append", default=[], help="only these arms (default: all, in protocol order)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", default=None, help="also write the report here")
    p.add_argument("--figure", default=None, metavar="PNG", help="also draw the guidance frontier (accuracy vs FD)")
    p.add_argument("--report-only", action="store_true", help="report the finished runs; train nothing")
    p.add_argument("--base-sweep", action="store_true",
                   help="only score the base at the post-hoc guidances between 1.5 and 2.0 (matched accuracy)")
    p.add_argument("--add-extractor", default=None, metavar="NAME",
                   help="post hoc: score every finished run with this independent extractor (e.g. mobilenet), "
                        "reusing cached samples; several processes may share the work")
    p.add_argument("--quiet", action="store_true", help="no progress")

    p = sub.add_parser("curve", help="held-out loss curve of a base and the runs that continued it: is it flat?")
    p.add_argument("files", nargs="+", help="the base first, then each FT file that continued it, in order")
    p.add_argument("--png", default=None, help="also draw the curve here")
    p.add_argument("--title", default="")

    p = sub.add_parser("table", help="run the comparison table of docs/results.md (FT / PT / DMP, ablations)")
    p.add_argument("--plan", required=True, help="JSON plan (see patches/table_plan.json)")
    p.add_argument("--runs", default="runs/table")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--report-only", action="store_true", help="write the doc from finished runs; train nothing")
    for name in ("eval", "compare", "curve", "table", "study"):
        add_threads(sub.choices[name])

    p = sub.add_parser("make-domain", help="the shipped MNIST digits in a shifted style, as an image folder to patch")
    p.add_argument("--style", required=True, choices=STYLES)
    p.add_argument("--out", required=True, help="folder to write <label>/<index>.png into")
    p.add_argument("--image-size", type=int, default=16, help="the mnist base's size")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from app.model.dmp import PatchError
    from app.model.loaders import CheckpointError
    from app.trainer.data import DataError
    from app.trainer.distributed import shutdown

    if getattr(args, "quiet", False):
        set_quiet()
    try:
        if args.command != "make-domain":
            set_threads(args.threads)
        if args.command in ("pretrain", "patch"):
            from app.trainer.train import Trainer

            method = "pretrain" if args.command == "pretrain" else args.baseline or "dmp"
            sign_key = getattr(args, "sign_key", None)
            if sign_key is not None:
                check_private_key(sign_key)  # before hours of training, not after
            trainer = Trainer(config_from(args, method), resume=not args.no_resume, progress=not args.quiet,
                              allow_batch_change=args.allow_batch_change)
            out = trainer.run()
            if trainer.dist.main:
                what = {"pretrain": "base", "ft": "FT checkpoint"}.get(method, method.upper() + " patch")
                print(f"wrote {what} {out}")
                if sign_key is not None:
                    print(f"wrote signature {sign_file(out, sign_key)}")
        elif args.command == "eval":
            from app.trainer.evaluate import quality_table, score_on_dataset
            from app.trainer.train import resolve_device

            result = score_on_dataset(args.base, args.patch, args.dataset, num_samples=args.num_samples,
                                      sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance_scale,
                                      seed=args.seed, device=str(resolve_device(args.device)), heldout=args.heldout,
                                      classifier_steps=args.classifier_steps, extractors=args.extractors)
            print(quality_table(result))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        elif args.command == "compare":
            from app.trainer.compare import main_compare

            main_compare(args)
        elif args.command == "study":
            from app.trainer.study import main_study

            main_study(args)
        elif args.command == "curve":
            from app.trainer.figures import flatness, heldout_curve, save_loss_curve

            curve = heldout_curve(args.files)
            print(json.dumps({"curve": curve, "last_20pct": flatness(curve)}))
            if args.png:
                save_loss_curve({" + ".join(Path(f).stem for f in args.files): curve}, args.png, title=args.title)
        elif args.command == "table":
            from app.trainer.table import run_table

            run_table(args.plan, args.runs, jobs=args.jobs, device=args.device, doc=args.doc,
                      report_only=args.report_only)
        elif args.command == "make-domain":
            from app.trainer.domains import make_domain

            if Path(args.out).exists() and any(Path(args.out).iterdir()):
                raise ValueError(f"{args.out} is not empty: choose a new folder")
            n = make_domain(args.style, args.out, args.image_size)
            print(f"wrote {n} {args.style} digits to {args.out}/<label>/")
    except (PatchError, CheckpointError, DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()  # leave torchrun's process group cleanly (no-op in a single process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
