"""Heatmap speed: streaming ``MinibatchCKA`` vs per-pair Gram recomputation, on the same activations.

In ONE run over 2,000 test images of the adapted CIFAR ResNet-56 (29 layers: stem, 27 block outputs, pooled
features), batch by batch:

1. the activations of every layer are captured once (``ActivationCapture``, default layers);
2. ``MinibatchCKA.update`` turns each layer's batch into one Gram matrix and all pairs into one matrix product;
3. the baseline — written here, the way torch_cka computes its minibatch CKA — loops over every (i, j) pair of the
   L × L matrix and recomputes both Gram matrices for that pair (U-centred, unbiased HSIC summed over batches in
   float64, the same estimator, so the values must agree to 1e-6).

Only step 2 and step 3 are timed against each other (the forward pass is shared and reported separately). With
``--quick`` the baseline runs on a seeded sample of the pairs and its time for the whole matrix is extrapolated
with its cost model (time ∝ d_i + d_j, the width of the two layers whose Grams it builds); the full run times
every pair.

Peak memory of a 10,000-image heatmap (``cka_analysis.cka.cka_matrix``) is measured in a fresh child process as its
peak resident set size (``VmHWM`` in /proc/self/status, which starts afresh at exec — ``ru_maxrss`` would inherit the
parent's peak), before and after the heatmap.
Run: ``python -m benchmarks.bench_cka [--quick] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from typing import Any

import torch

from cka_analysis.capture import ActivationCapture
from cka_analysis.cka import MinibatchCKA
from cka_analysis.device import resolve_device, synchronize

from .common import env_info, load_model, log, read_json, stacked, write_json

GOAL_SPEEDUP = 10.0
GOAL_MEMORY_BYTES = 2 * 1024**3


# --------------------------------------------------------------------------------------------------------------
# The per-pair baseline (torch_cka style): every pair recomputes both Gram matrices
# --------------------------------------------------------------------------------------------------------------


def _gram(f: torch.Tensor) -> torch.Tensor:
    x = f.reshape(f.shape[0], -1).double()
    return x @ x.T


def _u_centre(k: torch.Tensor) -> torch.Tensor:
    """U-centring of a Gram matrix (Székely & Rizzo 2014): zero diagonal, rows/cols corrected for the n − 2."""
    n = k.shape[0]
    k = k.clone()
    k.fill_diagonal_(0.0)
    col = k.sum(dim=0)
    total = col.sum()
    k = k - col[None, :] / (n - 2) - col[:, None] / (n - 2) + total / ((n - 1) * (n - 2))
    k.fill_diagonal_(0.0)
    return k


def _hsic_u(ku: torch.Tensor, lu: torch.Tensor) -> torch.Tensor:
    n = ku.shape[0]
    return (ku * lu).sum() / (n * (n - 3))


class PairwiseCKA:
    """Accumulates unbiased-HSIC minibatch CKA for the given (i, j) layer pairs, one pair at a time."""

    def __init__(self, pairs: list[tuple[int, int]]):
        self.pairs = pairs
        self.xy = torch.zeros(len(pairs), dtype=torch.float64)
        self.xx = torch.zeros(len(pairs), dtype=torch.float64)
        self.yy = torch.zeros(len(pairs), dtype=torch.float64)

    def update(self, feats: list[torch.Tensor]) -> None:
        for p, (i, j) in enumerate(self.pairs):
            ku = _u_centre(_gram(feats[i]))
            lu = _u_centre(_gram(feats[j]))
            self.xy[p] += _hsic_u(ku, lu).cpu()
            self.xx[p] += _hsic_u(ku, ku).cpu()
            self.yy[p] += _hsic_u(lu, lu).cpu()

    def compute(self) -> torch.Tensor:
        return self.xy / (self.xx.sqrt() * self.yy.sqrt())


# --------------------------------------------------------------------------------------------------------------
# Peak memory (child process)
# --------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh at ``execve``. (``ru_maxrss`` does not: Linux carries
    the parent's high-water mark over fork + exec, so a child of a big benchmark process would report the parent's
    peak.) Elsewhere: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.
    """
    try:
        for line in open("/proc/self/status"):  # noqa: SIM115
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(samples: int, device: str, batch: int) -> dict[str, Any]:
    """Run ``cka_matrix`` on ``samples`` test images in this (fresh) process and report its peak RSS."""
    from cka_analysis.cka import CKAOptions, cka_matrix

    from .common import _dataset

    dev = resolve_device(device)
    model = load_model("resnet56")
    # JPEGs read from disk batch by batch: decoding the whole split into memory first has its own, larger peak
    # (measured at ~2.6 GB for the 10,000 test images), which would hide what the heatmap itself needs
    ds = _dataset("test", False, False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    before = _rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    res = cka_matrix(model, loader, max_samples=samples, options=CKAOptions(device=dev))
    seconds = time.perf_counter() - t0
    after = _rss_bytes()
    out = {
        "samples": samples,
        "batch_size": batch,
        "layers": len(res.names_a),
        "seconds": seconds,
        "peak_rss_before_bytes": before,
        "peak_rss_bytes": after,
        "heatmap_peak_increase_bytes": after - before,
        "method": "VmHWM (peak resident set size) of /proc/self/status in a fresh child process: the whole "
                  "process — Python, torch, the model, and the heatmap over JPEGs read from disk",
    }
    if dev.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


# --------------------------------------------------------------------------------------------------------------
# Main benchmark
# --------------------------------------------------------------------------------------------------------------


def _profile_update(layers: list[torch.Tensor], device: torch.device) -> list[dict[str, Any]]:
    """Top operators (self CPU time) of ONE ``MinibatchCKA.update`` on the last batch's activations."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        MinibatchCKA(debiased=True).update(layers)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2),
             "share": round(e.self_cpu_time_total / total, 4) if total else None}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]]


def run(quick: bool = False, device: str = "auto", *, tiny: bool = False) -> dict[str, Any]:
    dev = resolve_device(device)
    n, batch = (200, 100) if tiny else (2000, 250)
    mem_samples = 500 if tiny else 10000
    model = load_model("resnet56").to(dev)
    x, _ = stacked("test", n, seed=1)
    log(f"bench_cka: ResNet-56, {n} test images, batch {batch}, {dev}")
    fast = MinibatchCKA(debiased=True)
    names: list[str] = []
    widths: list[int] = []
    pairwise: PairwiseCKA | None = None
    t_fwd = t_fast = t_pair = 0.0
    with ActivationCapture(model) as cap:
        for start in range(0, n, batch):
            xb = x[start:start + batch].to(dev)
            synchronize(dev)
            t0 = time.perf_counter()
            with torch.inference_mode():
                feats = cap.run(xb)
            synchronize(dev)
            t_fwd += time.perf_counter() - t0
            layers = list(feats.values())
            if pairwise is None:
                names = list(feats)
                widths = [f[0].numel() for f in layers]
                all_pairs = [(i, j) for i in range(len(layers)) for j in range(len(layers))]
                if quick or tiny:
                    pairs = sorted(random.Random(0).sample(all_pairs, 24))
                else:
                    pairs = all_pairs
                pairwise = PairwiseCKA(pairs)
            t0 = time.perf_counter()
            fast.update(layers)
            synchronize(dev)
            t_fast += time.perf_counter() - t0
            t0 = time.perf_counter()
            pairwise.update(layers)
            synchronize(dev)
            t_pair += time.perf_counter() - t0
            log(f"  batch {start // batch + 1}/{n // batch}: forward {t_fwd:.1f} s, minibatch {t_fast:.1f} s, "
                f"per-pair {t_pair:.1f} s")
    assert pairwise is not None
    t0 = time.perf_counter()
    mat = fast.compute()
    t_fast += time.perf_counter() - t0
    ref = pairwise.compute()
    got = torch.stack([mat[i, j] for i, j in pairwise.pairs])
    max_diff = float((got - ref).abs().max())
    num_layers = len(names)
    all_cost = sum(widths[i] + widths[j] for i in range(num_layers) for j in range(num_layers))
    sub_cost = sum(widths[i] + widths[j] for i, j in pairwise.pairs)
    t_pair_full = t_pair * all_cost / sub_cost
    res: dict[str, Any] = {
        "mode": "tiny" if tiny else ("quick" if quick else "full"),
        "env": env_info(dev),
        "model": "cifar_resnet56 (resnet56-cifar10jpeg.th)",
        "images": n,
        "batch_size": batch,
        "layers": names,
        "layer_widths": widths,
        "pairs_total": num_layers * num_layers,
        "pairs_timed_baseline": len(pairwise.pairs),
        "baseline_extrapolated": len(pairwise.pairs) < num_layers * num_layers,
        "forward_seconds": t_fwd,
        "minibatch_cka_seconds": t_fast,
        "per_pair_seconds_measured": t_pair,
        "per_pair_seconds_full_matrix": t_pair_full,
        "speedup_cka_only": t_pair_full / t_fast,
        "speedup_including_forward": (t_pair_full + t_fwd) / (t_fast + t_fwd),
        "max_abs_difference": max_diff,
        "values_equal_1e-6": max_diff <= 1e-6,
        "goal_speedup": GOAL_SPEEDUP,
    }
    res["meets_goal_speedup"] = res["speedup_cka_only"] >= GOAL_SPEEDUP
    log(f"  speed-up {res['speedup_cka_only']:.1f}× (CKA only), max |diff| {max_diff:.2e}")
    res["profile_minibatch_update_one_batch"] = _profile_update(layers, dev)
    write_json("cka.json", res)

    res.update(measure_memory(mem_samples, dev))
    write_json("cka.json", res)
    return res


def measure_memory(mem_samples: int, dev: torch.device) -> dict[str, Any]:
    """Run the heatmap in a fresh child process and return ``{"memory": ..., "goal_memory_bytes": ...}``."""
    res: dict[str, Any] = {}
    log(f"  peak memory of a {mem_samples:,}-image heatmap (child process)")
    cmd = [sys.executable, "-m", "benchmarks.bench_cka", "--memory-child", str(mem_samples), "--device", str(dev)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        mem = json.loads(proc.stdout.strip().splitlines()[-1])
        mem["meets_goal"] = mem["peak_rss_bytes"] <= GOAL_MEMORY_BYTES
        res["memory"] = mem
        log(f"  peak RSS {mem['peak_rss_bytes'] / 2**20:.0f} MiB ({mem['seconds']:.0f} s)")
    else:
        res["memory"] = {"error": proc.stderr[-2000:]}
    res["goal_memory_bytes"] = GOAL_MEMORY_BYTES
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true", help="only (re)measure the 10,000-image peak memory")
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.device, 250)))
        return
    if args.memory_only:  # re-measure the memory figure of an existing cka.json
        res = read_json("cka.json") or {}
        res.update(measure_memory(10000, resolve_device(args.device)))
        write_json("cka.json", res)
        return
    run(args.quick, args.device)


if __name__ == "__main__":
    main()
