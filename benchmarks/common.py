"""Shared helpers of the benchmarks: environment record, shared data, models, cached tensors, evaluation.

All compute honours a ``device`` argument (``auto`` = CUDA when available, else CPU). On the CPU the models run
in channels_last memory format, which is 1.3–1.7× faster for these small convolutions with oneDNN; the numbers do
not change (same arithmetic up to float32 rounding).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cka_analysis.config import shared_data_dir
from cka_analysis.data import calibration_subset, load_dataset
from cka_analysis.device import describe_device, resolve_device
from cka_analysis.errors import DataError
from cka_analysis.export import jsonable
from cka_analysis.metrics import evaluate
from cka_analysis.models import build_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path(__file__).resolve().parent / ".cache"


def results_dir() -> Path:
    """Where JSON, plots and the report go: ``benchmarks/results`` (the committed results), or
    ``$CKA_BENCH_RESULTS`` when set (the ``--tiny`` development mode uses ``benchmarks/.cache/tiny-results`` so
    that it never overwrites the committed numbers)."""
    env = os.environ.get("CKA_BENCH_RESULTS")
    return Path(env) if env else RESULTS_DIR


ARCHS = {"resnet56": "cifar_resnet56", "resnet20": "cifar_resnet20"}


def accuracy_se(acc: float, images: int) -> float:
    """The standard error, in points, of a top-1 accuracy ``acc`` (in %) measured on ``images`` images (binomial):
    about 0.4 at 91 % on 5,000 images, 0.3 at 89 % on 10,000."""
    if images <= 0:
        raise ValueError(f"images={images} must be positive")
    p = min(max(acc / 100.0, 0.0), 1.0)
    return 100.0 * (p * (1.0 - p) / images) ** 0.5


def log(msg: str) -> None:
    """Progress line on stderr with a wall-clock stamp (benchmarks are long; say what they are doing)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_info(device: str | torch.device = "auto") -> dict[str, Any]:
    """Where the numbers were measured: CPU model, cores/threads, torch version, device, load at start."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    dev = resolve_device(device)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": describe_device(dev),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_at_start": None if load is None else [round(v, 2) for v in load],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def data_root() -> Path:
    """The shared CIFAR-10 JPEG copy; a clear error when the shared data folder is absent."""
    root = shared_data_dir()
    if not (root / "cifar10-jpeg").is_dir() or not (root / "weights").is_dir():
        raise DataError(
            f"shared data not found at {root} (expected cifar10-jpeg/ and weights/); "
            "set CKA_PRUNE_DATA to the folder that holds them"
        )
    return root


def data_spec() -> str:
    return f"imagefolder:{data_root() / 'cifar10-jpeg'}"


def load_model(arch: str) -> nn.Module:
    """The adapted CIFAR ResNet (``resnet56`` / ``resnet20``) with its JPEG-copy weights, in eval mode."""
    path = data_root() / "weights" / f"{arch}-cifar10jpeg.th"
    return build_model(ARCHS[arch], weights=str(path)).eval()


def fast_format(model: nn.Module, device: torch.device) -> nn.Module:
    """channels_last on the CPU (faster oneDNN convolutions); the training/eval code handles CUDA itself."""
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


@lru_cache(maxsize=4)
def dataset(split: str, augment: bool, in_memory: bool):
    """One split of the shared CIFAR-10 copy for the CIFAR ResNets' preset, loaded once per process."""
    preset = load_model("resnet20").cka_preset  # both archs share the preset (32×32, ImageNet mean/std)
    return load_dataset(data_spec(), split, preset, augment=augment, in_memory=in_memory)


_dataset = dataset  # the name bench_cka uses


def stacked(split: str, n: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) tensors of ``n`` class-balanced seeded images of a split (all when n is None).

    Only the chosen images are decoded. Cached under ``benchmarks/.cache`` so that repeated runs skip decoding.
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{split}-{n or 'all'}-{seed}.pt"
    if path.exists():
        d = torch.load(path, weights_only=True)
        return d["x"], d["y"]
    ds = dataset(split, False, False)
    sub = range(len(ds)) if n is None or n >= len(ds) else calibration_subset(ds, n, seed=seed).indices
    xs, ys = [], []
    for i in sub:
        x, y = ds[i]
        xs.append(x)
        ys.append(y)
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.long)
    torch.save({"x": x, "y": y}, path)
    return x, y


def tensor_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Top-1 (%) of ``model`` on the given test tensors (library :func:`cka_analysis.metrics.evaluate`)."""
    fast_format(model, device)
    return evaluate(model, tensor_loader(x, y), device=device).top1


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def write_json(name: str, obj: Any) -> Path:
    results_dir().mkdir(parents=True, exist_ok=True)
    path = results_dir() / name
    path.write_text(json.dumps(jsonable(obj), indent=1) + "\n")
    return path


def read_json(name: str) -> Any:
    path = results_dir() / name
    return json.loads(path.read_text()) if path.exists() else None


def load_rows(path: Path) -> dict[str, Any]:
    """A row-by-row results file (``{"rows": [...], ...}``), empty when it does not exist yet."""
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


def save_row(path: Path, row: dict[str, Any]) -> None:
    """Append (or replace, by ``id``) one finished row of a results file and write it atomically, under a lock:
    several processes (stages, or runs sharing one GPU) may finish rows at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_rows(path)
        data["rows"] = [r for r in data["rows"] if r["id"] != row["id"]] + [row]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


@dataclass(frozen=True)
class RowStore:
    """One row-by-row results file of a benchmark, ``results_dir() / name`` (resolved at each call, so that
    ``$CKA_BENCH_RESULTS`` set later is followed): load it, the ids already finished, save a finished row."""

    name: str

    @property
    def path(self) -> Path:
        return results_dir() / self.name

    def load(self) -> dict[str, Any]:
        return load_rows(self.path)

    def finished_ids(self) -> set[str]:
        return {r["id"] for r in self.load()["rows"]}

    def save(self, row: dict[str, Any]) -> None:
        save_row(self.path, row)


def rows_to_run(todo: list[dict[str, Any]], finished: Callable[[], set[str]], claim: Callable[[str], bool],
                until: float | None = None, budget: int | None = None) -> Iterator[dict[str, Any]]:
    """The rows of ``todo`` this process runs now, in order: rows already finished (``finished()`` is read again
    before each row: other processes finish rows too) or claimed by another process (``claim(id)`` False) are
    skipped; no new row starts after the UNIX time ``until``; with ``budget`` every row spends that many training
    images instead of its own (a quick end-to-end check of a benchmark)."""
    for spec in todo:
        if until is not None and time.time() > until:
            log("--until reached: no new rows")
            return
        if spec["id"] in finished() or not claim(spec["id"]):
            continue
        yield spec if budget is None else {**spec, "recovery": str(budget)}
