"""Recovery throughput: images/s of a real recovery against the floor the hardware allows (issue 19, point 3).

For ResNet-56 ``cifar10jpeg`` pruned by CKA to −52.6 % and −75.2 % MACs (the blocks of the recovery benchmark's
rows), in one run:

* ``real`` — :func:`cka_analysis.recovery.recover` with the default recipe (``feature``: cross-entropy, logit
  distillation and feature mimicking at every kept block, teacher forward once per batch) on the CIFAR-10
  training images: data, augmentation, every loss term and the update. Timed between the trainer's progress
  reports (every 10 steps), so the fixed costs (decoding, batch-norm re-estimation, moving the images to the
  device) are left out.
* ``floor`` — the same teacher forward + student forward/backward (cross-entropy + distillation) + SGD update,
  in the same precision and memory format, on one synthetic batch already on the device, in a tight loop with
  one synchronisation per 10 steps.

Both are reported as the mean over the timed steps and as the best 10-step window: on a machine shared with other
jobs (the 2-core CPU here), the best windows are what the code can do, the means what it did under the load
recorded in ``env.loadavg_at_start``. The real run also counts the page faults per step.

On the CPU, ``--allocator both`` measures glibc's default allocator settings (in a child process, since the tuning
cannot be undone) and then the tuned ones the trainer sets (:func:`cka_analysis.device.tune_cpu_allocator`), in
one run: the allocator is in each row's id and in the report.

``python -m benchmarks.throughput [--device cpu|cuda] [--threads 1,2] [--steps N] [--batch-size B]
[--allocator tuned|default|both]`` appends one row per (device, threads, target, batch size, allocator) to
``results/throughput.json`` (a rerun replaces its rows).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import RowStore, env_info, load_model, log

#: The rows file (a rerun replaces its rows, by id).
STORE = RowStore("throughput.json")
#: The blocks CKA one-shot removes at each target (the recovery benchmark's ``resnet56-cka-*-s0`` rows).
TARGETS = {"macs:50%": "resnet56-cka-macs50-standard-s0", "macs:75%": "resnet56-cka-macs75-standard-s0"}


def _removed(row_id: str) -> list[str]:
    rows = json.loads((Path(__file__).resolve().parent / "results" / "recovery.json").read_text())["rows"]
    return next(r["removed"] for r in rows if r["id"] == row_id)


def _train_data() -> Any:
    from benchmarks.common import data_spec
    from cka_analysis.data import load_dataset

    teacher = load_model("resnet56")
    return load_dataset(data_spec(), "train", teacher.cka_preset, augment=True, in_memory=True)


def real(student: torch.nn.Module, teacher: torch.nn.Module, data: Any, steps: int, batch_size: int,
         device: str) -> dict[str, Any]:
    """Images/s of recover() between its first and last progress report (10-step spacing), and the minor page
    faults per step over the same steps."""
    from cka_analysis.recovery import RecoveryConfig, recover

    cfg = RecoveryConfig(images=2048 + (steps + 1) * batch_size, batch_size=batch_size)
    marks: list[tuple[float, int, int]] = []

    def progress(done: int, total: int | None, message: str) -> None:
        if message.startswith("training: step"):
            marks.append((time.perf_counter(), done, resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

    res = recover(copy.deepcopy(student), data, cfg, teacher=teacher, device=device, progress=progress)
    (t0, s0, f0), (t1, s1, f1) = marks[0], marks[-1]
    windows = [(b[1] - a[1]) * batch_size / (b[0] - a[0]) for a, b in itertools.pairwise(marks)]
    return {"images_per_s": (s1 - s0) * batch_size / (t1 - t0), "best_window": max(windows),
            "steps_timed": s1 - s0, "amp": res.amp, "seconds": res.seconds,
            "page_faults_per_step": (f1 - f0) / (s1 - s0)}


def data_path(data: Any, preset: Any, batch_size: int, device: str, batches: int = 50) -> dict[str, float]:
    """Milliseconds per augmented batch on the device: the DataLoader over the dataset (per-image transform,
    collate, copy), as recovery drew batches before, against :class:`~cka_analysis.training.TensorBatches`."""
    from cka_analysis.device import resolve_device, synchronize
    from cka_analysis.distributed import make_loader_for_world
    from cka_analysis.recovery import plain_and_augment
    from cka_analysis.training import TensorBatches

    dev = resolve_device(device)
    plain, augment = plain_and_augment(data, preset, 0)
    loader = make_loader_for_world(plain, global_batch_size=batch_size, shuffle=True, seed=0, drop_last=True,
                                   device=dev)
    fast = TensorBatches.from_dataset(plain, preset, batch_size=batch_size,
                                      sampler=loader.sampler, device=dev)
    out = {}
    for name, source in (("loader_ms", loader), ("tensor_batches_ms", fast)):
        it = iter(source)
        next(it)
        synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(batches):
            x, _y = next(it)
            augment(x.to(dev, non_blocking=True))
        synchronize(dev)
        out[name] = 1000 * (time.perf_counter() - t0) / batches
    return out


def floor(student: torch.nn.Module, teacher: torch.nn.Module, steps: int, batch_size: int,
          device: str, compile_mode: str | None = None) -> dict[str, Any]:
    """Images/s of teacher forward + student forward/backward + update on one batch already on the device.

    ``compile_mode``: run both networks through ``torch.compile`` with this mode (``"default"``, or
    ``"reduce-overhead"`` for CUDA graphs); ``warmup_seconds`` then holds the compilation."""
    from cka_analysis.device import resolve_device, synchronize, tune_cpu_allocator
    from cka_analysis.recovery import RecoveryConfig
    from cka_analysis.training import (
        distillation_loss,
        train_in_channels_last,
        training_autocast,
        training_dtype,
    )

    dev = resolve_device(device)
    if dev.type == "cpu":  # the allocator the trainer runs with
        tune_cpu_allocator()
    cfg = RecoveryConfig()
    s, t = copy.deepcopy(student).to(dev).train(), copy.deepcopy(teacher).to(dev).eval()
    x = torch.randn(batch_size, *student.cka_preset.input_size, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    if train_in_channels_last(dev, s):
        s.to(memory_format=torch.channels_last)
        t.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = training_dtype(cfg.amp, dev)
    opt = torch.optim.SGD(s.parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4)
    s_run, t_run = (s, t) if compile_mode is None else (torch.compile(s, mode=compile_mode),
                                                        torch.compile(t, mode=compile_mode))

    def step() -> None:
        with training_autocast(dev, dtype):
            with torch.no_grad():
                t_logits = t_run(x)
            logits = s_run(x)
            loss = 0.5 * F.cross_entropy(logits.float(), y) + 0.5 * distillation_loss(logits, t_logits, 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warm = time.perf_counter()
    for _ in range(3):
        step()
    synchronize(dev)
    warmup_seconds = time.perf_counter() - warm
    windows = []
    start = t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step()
        if i % 10 == 0:  # per-10-step windows, as the real run is timed (one synchronisation per window)
            synchronize(dev)
            now = time.perf_counter()
            windows.append(10 * batch_size / (now - t0))
            t0 = now
    synchronize(dev)
    return {"images_per_s": steps * batch_size / (time.perf_counter() - start),
            "best_window": max(windows) if windows else None, "steps_timed": steps,
            "warmup_seconds": warmup_seconds}


def compile_modes(dev: torch.device) -> list[str]:
    """The ``torch.compile`` modes worth timing on ``dev``: graph fusion everywhere, CUDA graphs on CUDA (ResNet-56's
    small kernels leave a GPU waiting on their launches)."""
    return ["default", "reduce-overhead"] if dev.type == "cuda" else ["default"]


def report_lines() -> list[str]:
    """The throughput section of REPORT.md (empty without results)."""
    rows = STORE.load()["rows"]
    if not rows:
        return []
    lines = ["## Recovery throughput (`python -m benchmarks.throughput`)\n",
             "Images/s of a real recovery (data, augmentation, every loss term of the default `feature` recipe, "
             "update) against the floor (teacher forward + student forward/backward with cross-entropy and "
             "distillation + update on one synthetic batch already on the device), ResNet-56, CKA's blocks; mean "
             "over the timed steps and the best 10-step window (the machine may be shared: load average at start "
             "in the last column).\n",
             "| device | threads | allocator | MACs removed | batch | real images/s | floor images/s | ratio | best "
             "windows: real / floor (ratio) | page faults per real step | data + augmentation, ms/batch: DataLoader "
             "→ TensorBatches | floor through torch.compile: images/s (× eager, seconds to compile) | precision | "
             "load |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---|---|---|---|"]
    for r in rows:
        faults = f"{r['page_faults_per_step']:,.0f}" if r.get("page_faults_per_step") is not None else "–"
        lines.append(f"| {r['device']} | {r['threads']} | {r.get('allocator', '–')} | "
                     f"{100 * r['macs_reduction']:.1f} % | {r['batch_size']} | "
                     f"{r['real_images_per_s']:.0f} | {r['floor_images_per_s']:.0f} | {r['ratio']:.2f} | "
                     f"{r['real_best_window']:.0f} / {r['floor_best_window']:.0f} ({r['ratio_best_windows']:.2f}) | "
                     f"{faults} | " + (f"{r['data_path_ms_per_batch']['loader_ms']:.1f} → "
                        f"{r['data_path_ms_per_batch']['tensor_batches_ms']:.1f} | "
                        if r.get("data_path_ms_per_batch") else "– | ") +
                     ("; ".join(f"{m}: {c['images_per_s']:.0f} ({c['speedup']:.2f}×, {c['compile_seconds']:.0f} s)"
                                for m, c in r.get("floor_compiled", {}).items()) or "–") + " | " +
                     f"{r['amp'] or 'float32'} | {r['env'].get('loadavg_at_start')} |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts to measure (CPU)")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per measurement (default 40)")
    ap.add_argument("--batch-size", type=int, default=64, help="batch size (default 64, the recipe's)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the floor through torch.compile (default mode; on CUDA also reduce-overhead, "
                         "i.e. CUDA graphs), compilation time included in the row")
    ap.add_argument("--allocator", choices=["tuned", "default", "both"], default="tuned",
                    help="CPU memory allocator: the trainer's tuned setting (default), glibc's defaults, or both "
                         "in one run (glibc's in a child process first)")
    args = ap.parse_args(argv)
    from cka_analysis.blocks import remove_blocks
    from cka_analysis.device import CPU_ALLOCATOR_ENV, resolve_device, tune_cpu_allocator
    from cka_analysis.metrics import count_macs

    dev = resolve_device(args.device)
    if args.allocator == "both" and dev.type == "cpu":
        child = ["--device", args.device, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                 "--allocator", "default", *(["--threads", args.threads] if args.threads else []),
                 *(["--compile"] if args.compile else [])]
        log("glibc's default allocator, in a child process")
        subprocess.run([sys.executable, "-m", "benchmarks.throughput", *child], check=True,
                       env={**os.environ, CPU_ALLOCATOR_ENV: "default"})
    if args.allocator == "default":
        os.environ[CPU_ALLOCATOR_ENV] = "default"  # before anything tunes it
    allocator = ("tuned" if tune_cpu_allocator() else "glibc default") if dev.type == "cpu" else "–"
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    teacher = load_model("resnet56")
    data = _train_data()
    base_macs = count_macs(teacher, teacher.cka_preset.input_size)
    for n in threads:
        torch.set_num_threads(n)
        log(f"{dev} threads={n}: data path")
        dp = data_path(data, teacher.cka_preset, args.batch_size, str(dev))
        log(f"data path: DataLoader {dp['loader_ms']:.1f} ms/batch, TensorBatches {dp['tensor_batches_ms']:.1f} "
            "ms/batch (augmentation included)")
        for target, row_id in TARGETS.items():
            student = remove_blocks(teacher, _removed(row_id))
            macs = 1 - count_macs(student, student.cka_preset.input_size) / base_macs
            log(f"{dev} threads={n} {target}: floor")
            fl = floor(student, teacher, args.steps, args.batch_size, str(dev))
            compiled = {}
            for mode in compile_modes(dev) if args.compile else []:
                log(f"{dev} threads={n} {target}: floor through torch.compile(mode={mode!r})")
                c = floor(student, teacher, args.steps, args.batch_size, str(dev), compile_mode=mode)
                compiled[mode] = {"images_per_s": c["images_per_s"], "best_window": c["best_window"],
                                  "compile_seconds": c["warmup_seconds"],
                                  "speedup": c["images_per_s"] / fl["images_per_s"]}
                log(f"  compiled ({mode}): {c['images_per_s']:.0f} images/s = {compiled[mode]['speedup']:.2f}x "
                    f"eager, {c['warmup_seconds']:.0f} s to compile")
            log(f"{dev} threads={n} {target}: real recovery")
            re = real(student, teacher, data, args.steps, args.batch_size, str(dev))
            env = env_info(dev)
            suffix = "-glibc" if allocator == "glibc default" else ""
            row = {"id": f"{env['device']}-t{n}-{target}-b{args.batch_size}{suffix}", "target": target,
                   "macs_reduction": macs, "batch_size": args.batch_size, "threads": n, "device": env["device"],
                   "allocator": allocator, "page_faults_per_step": re["page_faults_per_step"],
                   "real_images_per_s": re["images_per_s"], "floor_images_per_s": fl["images_per_s"],
                   "ratio": re["images_per_s"] / fl["images_per_s"],
                   "data_path_ms_per_batch": dp, "real_best_window": re["best_window"], "floor_best_window": fl["best_window"],
                   "ratio_best_windows": re["best_window"] / fl["best_window"], "amp": re["amp"],
                   "steps_timed": re["steps_timed"], **({"floor_compiled": compiled} if compiled else {}),
                   "env": env, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            log(f"{row['id']}: real {row['real_images_per_s']:.0f} images/s, floor "
                f"{row['floor_images_per_s']:.0f} images/s, ratio {row['ratio']:.2f} (best 10-step windows: "
                f"{row['real_best_window']:.0f} / {row['floor_best_window']:.0f} = {row['ratio_best_windows']:.2f}), "
                f"{row['page_faults_per_step']:,.0f} page faults per step ({allocator})")
            STORE.save(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
