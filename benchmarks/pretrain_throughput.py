"""Pretraining throughput: images/s and peak memory of one SSL optimizer step, per method.

Runs the real training step (:class:`medssl.engines.trainer.PretrainingTrainer`: input normalisation, method
forward, backward, optimizer, EMA/prototype hooks) on synthetic views already in memory, so the figure is the
model's speed, not the data pipeline's. Each configuration runs in a fresh subprocess (peak memory is per
configuration) and prints one JSON line::

    {"method", "arch", "image_size", "batch_size", "precision", "channels_last", "compile", "device",
     "images_per_s", "step_s", "peak_memory_mib", "peak_memory_kind"}

``images_per_s`` counts source images (each with its views) per second; peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's ``ru_maxrss`` on CPU.

Examples::

    python benchmarks/pretrain_throughput.py --arch resnet18 --widen-factor 0.25 --small-stem --image-size 32 \\
        --batch-size 16 --device cpu --iterations 5
    python benchmarks/pretrain_throughput.py --arch resnet50 --image-size 224 --batch-size 256 --precision bf16 \\
        --channels-last --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(cfg: dict) -> dict:
    """Time ``cfg["iterations"]`` steps after ``cfg["warmup"]`` untimed ones; return the JSON record."""
    import torch
    from ignite.engine import Events

    from medssl.engines.config import METHOD_DEFAULTS
    from medssl.engines.optim import build_optimizer
    from medssl.engines.schedules import WarmupCosineSchedule
    from medssl.engines.trainer import PretrainingTrainer
    from medssl.methods import build_method
    from medssl.models import IMAGENET_NORMALIZATION, InputNormalization, build_backbone

    torch.manual_seed(0)
    device = torch.device(cfg["device"])
    backbone = build_backbone(cfg["arch"], small_stem=cfg["small_stem"], widen_factor=cfg["widen_factor"])
    options = {"num_local_crops": cfg["num_local_crops"]} if cfg["method"] == "swav" else {}
    method = build_method(cfg["method"], backbone, **options).to(device)
    if cfg["channels_last"]:
        method = method.to(memory_format=torch.channels_last)
    defaults = METHOD_DEFAULTS[cfg["method"]]
    lr = defaults["lr_per_256"] * cfg["batch_size"] / 256
    optimizer = build_optimizer(defaults["optimizer"], method.param_groups(defaults["weight_decay"], lr), lr=lr,
                                weight_decay=defaults["weight_decay"])
    total = cfg["warmup"] + cfg["iterations"]
    method.configure_run(steps_per_epoch=total, global_batch_size=cfg["batch_size"], max_iterations=total)
    schedule = WarmupCosineSchedule(optimizer, base_lr=lr, max_iterations=total)
    b, s = cfg["batch_size"], cfg["image_size"]
    views = [torch.rand(b, 3, s, s) for _ in range(2)]
    local = max(8, round(s * 96 / 224))
    views += [torch.rand(b, 3, local, local) for _ in range(method.views_required - 2)]
    batch = {"views": [v.to(device) for v in views]}
    network = torch.compile(method) if cfg["compile"] else method
    trainer = PretrainingTrainer(method=method, optimizer=optimizer, schedule=schedule,
                                 normalization=InputNormalization.from_spec(IMAGENET_NORMALIZATION).to(device),
                                 data_loader=[batch] * total, max_iterations=total, epoch_length=total,
                                 device=device, precision=cfg["precision"], channels_last=cfg["channels_last"],
                                 network=network)
    marks: dict[str, float] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _mark(engine) -> None:
        if engine.state.iteration == cfg["warmup"]:
            sync()
            marks["start"] = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

    trainer.run()
    sync()
    elapsed = time.perf_counter() - marks["start"]
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"
    return {**{k: cfg[k] for k in ("method", "arch", "widen_factor", "small_stem", "image_size", "batch_size",
                                   "precision", "channels_last", "compile", "device")},
            "num_views": method.views_required, "images_per_s": round(b * cfg["iterations"] / elapsed, 2),
            "step_s": round(elapsed / cfg["iterations"], 4), "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="simclr,swav,byol,simsiam")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--widen-factor", type=float, default=1.0)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iterations", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--num-local-crops", type=int, default=6, help="SwAV local crops (96/224 of the image size)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.single:
        import torch

        cfg = json.loads(args.single)
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        print(json.dumps(measure(cfg)), flush=True)
        return 0
    base = {k: getattr(args, k) for k in ("arch", "widen_factor", "small_stem", "image_size", "batch_size",
                                          "precision", "channels_last", "compile", "device", "iterations",
                                          "warmup", "num_local_crops", "threads")}
    status = 0
    for method in args.methods.split(","):
        cfg = {**base, "method": method.strip()}
        proc = subprocess.run([sys.executable, __file__, "--single", json.dumps(cfg)], capture_output=True,
                              text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            print(lines[-1], flush=True)
        else:
            status = 1
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            print(json.dumps({**cfg, "error": tail[0]}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
