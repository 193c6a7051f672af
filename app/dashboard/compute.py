"""Cached wrappers around the library's computations (``st.cache_data``), run inside background jobs.

Each wrapper is keyed by plain strings that name its inputs (model key, data key, options, device); the model,
the loaders, the progress callback and the cancel token are passed as underscore arguments, which Streamlit
does not hash. A cancelled or failed computation raises, so nothing partial is cached. Results are plain data
(lists, dicts, floats), so they pickle cheaply and survive reruns.

No math lives here: every number comes from :mod:`cka_analysis`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import streamlit as st
from torch import nn

from cka_analysis.cka import CKAOptions, cka_matrix
from cka_analysis.config import cache_dir
from cka_analysis.errors import CKAPruneError
from cka_analysis.export import export_onnx, export_pt2, save_pruned
from cka_analysis.latency import TimingOptions, compare_latency
from cka_analysis.metrics import evaluate
from cka_analysis.native import NATIVE_FAMILIES, NativeUnsupported, export_native, native_dir_name
from cka_analysis.robustness import RobustnessResult, evaluate_robustness
from cka_analysis.scoring import ScoringOptions, score_blocks
from cka_analysis.workflow import estimate_further, estimate_run

#: Untimed rounds before the Compare page's timed ones (as :data:`cka_analysis.latency.COMPARE_TIMING`).
LATENCY_WARMUP = 3


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy for one job: cached models are shared between sessions and must never carry a job's hooks."""
    return copy.deepcopy(model)


@st.cache_data(show_spinner=False, max_entries=64)
def test_accuracy(model_key: str, data_key: str, device: str, samples: int, *,
                  _model: nn.Module, _loader: Any, _progress=None, _cancel=None) -> dict:
    """Top-1 (top-5) accuracy and loss on ``_loader``: the "N test images" of ``state.test_loader(a, samples)``
    (``workflow.eval_subset``), the images a pruning run with ``eval_samples=samples`` is measured on."""
    acc = evaluate(private_copy(_model), _loader, device=device, progress=_progress, cancel=_cancel)
    return {"top1": acc.top1, "top5": acc.top5, "loss": acc.loss, "samples": acc.samples}


def _matrix_dict(result: Any) -> dict:
    return {"matrix": result.matrix.tolist(), "names_a": list(result.names_a), "names_b": list(result.names_b)}


@st.cache_data(show_spinner=False, max_entries=64)
def heatmap(model_key: str, data_key: str, kernel: str, debiased: bool, device: str, *,
            _model: nn.Module, _loader: Any, _progress=None, _cancel=None) -> dict:
    """Layer × layer CKA of the model over the calibration images."""
    options = CKAOptions(kernel=kernel, debiased=debiased, device=device)
    res = cka_matrix(private_copy(_model), _loader, options=options, progress=_progress, cancel=_cancel)
    return _matrix_dict(res)


@st.cache_data(show_spinner=False, max_entries=64)
def cross_heatmap(model_key: str, run_id: str, data_key: str, kernel: str, debiased: bool, device: str, *,
                  _model: nn.Module, _pruned: nn.Module, _loader: Any, _progress=None, _cancel=None) -> dict:
    """Original (rows) × pruned (columns) CKA over the same calibration images."""
    res = cka_matrix(private_copy(_model), _loader, model_b=private_copy(_pruned),
                     options=CKAOptions(kernel=kernel, debiased=debiased, device=device), progress=_progress,
                     cancel=_cancel)
    return _matrix_dict(res)


@st.cache_data(show_spinner=False, max_entries=256)
def scores(model_key: str, data_key: str, criterion: str, debiased: bool, device: str, *,
           _model: nn.Module, _loader: Any, _progress=None, _cancel=None) -> dict:
    """Removal scores of every removable block under one criterion (``Scores.to_dict()``)."""
    options = ScoringOptions(debiased=debiased, device=device)
    res = score_blocks(private_copy(_model), _loader, criterion, options=options, progress=_progress, cancel=_cancel)
    return res.to_dict()


def many_scores(model_key: str, data_key: str, criteria: list[str], debiased: bool, device: str, *,
                model: nn.Module, loader: Any, progress=None, cancel=None) -> dict[str, dict]:
    """Scores under several criteria (each cached on its own), with overall progress.

    ``debiased`` applies to the ``cka`` criterion only.
    """
    out: dict[str, dict] = {}
    for i, criterion in enumerate(criteria):
        def step(done: int, total: int | None, message: str, i: int = i, c: str = criterion) -> None:
            if progress is not None:
                progress(i, len(criteria), f"{c} ({i + 1}/{len(criteria)}): {message}")

        deb = debiased and criterion == "cka"
        out[criterion] = scores(model_key, data_key, criterion, deb, device, _model=model, _loader=loader,
                                _progress=step, _cancel=cancel)
    if progress is not None:
        progress(len(criteria), len(criteria), "done")
    return out


@st.cache_data(show_spinner=False, max_entries=64)
def robustness(model_key: str, data_key: str, kinds: tuple[str, ...], eps: tuple[float, ...],
               max_samples: int, device: str, *, _model: nn.Module, _loader: Any, _mean: tuple, _std: tuple,
               _progress=None, _cancel=None) -> RobustnessResult:
    """Clean, FGSM/PGD and corruption accuracy (``evaluate_robustness``), as the typed record."""
    return evaluate_robustness(private_copy(_model), _loader, mean=_mean, std=_std, kinds=kinds, eps=eps,
                               max_samples=max_samples, device=device, progress=_progress, cancel=_cancel)


@st.cache_data(show_spinner=False, max_entries=64)
def latency(model_keys: tuple[str, ...], batch_size: int, repeats: int, device: str, *,
            _models: dict[str, nn.Module], _progress=None, _cancel=None) -> dict[str, dict]:
    """Latency of every model at one batch size, timed interleaved round by round on the same input
    (``cka_analysis.latency.compare_latency``, the measurement of the CLI's ``report.json``), each relative to the
    first model (``ratio``: time / the first model's time in the same round, with its 10th–90th percentile)."""
    options = TimingOptions(warmup=LATENCY_WARMUP, repeats=repeats)
    lat = compare_latency({k: _models[k] for k in model_keys}, batch_size=batch_size, device=device,
                          options=options, reference=model_keys[0], progress=_progress, cancel=_cancel)
    return {k: {**asdict(v), "throughput": v.throughput} for k, v in lat.items()}


def compare_runs(entries: list[dict], *, robustness_kinds: tuple[str, ...], eps: tuple[float, ...],
                 max_samples: int, batch_size: int, repeats: int, device: str, data_key: str, loader: Any,
                 mean: tuple, std: tuple, progress=None, cancel=None) -> dict[str, dict]:
    """Latency and robustness of several models: ``{key: {"latency": ..., "robustness": ...}}``.

    ``entries`` are ``{"key", "model", "label"}`` dicts, the reference (the original) first. Latency is one
    interleaved measurement of all of them (cached for that set of models); robustness is measured, and cached,
    model by model on ``loader``'s images (the seeded, class-balanced "N test images").
    """
    out: dict[str, dict] = {}
    n = len(entries) + 1

    def lat_step(done: int, total: int | None, message: str) -> None:
        if progress is not None:
            progress(0, n, f"latency of {len(entries)} model(s), interleaved: {message}")

    lat_step(0, None, "warming up")
    keys = tuple(e["key"] for e in entries)
    lat = latency(keys, batch_size, repeats, device, _models={e["key"]: e["model"] for e in entries},
                  _progress=lat_step, _cancel=cancel)
    for i, e in enumerate(entries):
        def step(done: int, total: int | None, message: str, i: int = i, label: str = e["label"]) -> None:
            if progress is not None:
                progress(i + 1, n, f"{label}: {message}")

        rob = None
        if robustness_kinds:
            rob = robustness(e["key"], data_key, robustness_kinds, eps, max_samples, device, _model=e["model"],
                             _loader=loader, _mean=mean, _std=std, _progress=step, _cancel=cancel)
        out[e["key"]] = {"latency": lat[e["key"]], "robustness": rob}
    if progress is not None:
        progress(n, n, "done")
    return out


def _zip_dir(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, arcname=f"{folder.name}/{f.name}")
    return buf.getvalue()


def build_exports(model: nn.Module, name: str, report: dict, formats: tuple[str, ...], *,
                  progress=None, cancel=None) -> dict[str, Any]:
    """Write the requested exports into a private temporary folder and return their bytes.

    ``formats`` ⊆ ``("safetensors", "native", "pt2", "onnx")``; ``native`` is the model in its own library's
    format (a Hugging Face directory, or a timm / torchvision state dict + config:
    :func:`cka_analysis.native.export_native`). Returns ``{"files": {format: (file name, bytes)},
    "errors": {format: message}, "onnx": info}``: one format failing (an architecture ``torch.export`` cannot
    trace, say) does not lose the others. The temporary folder is removed before returning.
    """
    from cka_analysis.progress import check_cancel

    model = private_copy(model).cpu().eval()
    tmp = Path(tempfile.mkdtemp(prefix="cka-prune-export-"))
    out: dict[str, Any] = {"files": {}, "errors": {}, "onnx": None}
    try:
        steps = [f for f in ("safetensors", "native", "pt2", "onnx") if f in formats]
        for i, fmt in enumerate(steps):
            check_cancel(cancel, "the export")
            if progress is not None:
                progress(i, len(steps), f"writing {fmt}")
            try:
                if fmt == "safetensors":
                    folder = save_pruned(model, tmp / name, report=report)
                    out["files"][fmt] = (f"{name}.zip", _zip_dir(folder))
                elif fmt == "native":
                    dirname = native_dir_name(model)
                    if dirname is None:
                        raise NativeUnsupported(f"only {NATIVE_FAMILIES} have a native format; the "
                                                "safetensors + manifest export holds this one")
                    folder = tmp / f"{name}-{dirname}"
                    export_native(model, folder)
                    out["files"][fmt] = (f"{folder.name}.zip", _zip_dir(folder))
                elif fmt == "pt2":
                    path = export_pt2(model, tmp / f"{name}.pt2")
                    out["files"][fmt] = (path.name, path.read_bytes())
                else:
                    info = export_onnx(model, tmp / f"{name}.onnx")
                    out["onnx"] = {k: v for k, v in info.items() if k != "path"}
                    out["files"][fmt] = (f"{name}.onnx", Path(info["path"]).read_bytes())
            except CKAPruneError as exc:
                out["errors"][fmt] = str(exc)
            except Exception as exc:  # an exporter that cannot handle this architecture
                out["errors"][fmt] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if progress is not None:
            progress(len(steps), len(steps), "done")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@st.cache_data(show_spinner=False, max_entries=64)
def run_estimate(model_key: str, request_key: str, left: str | None = None, *, _request: Any,
                 _model: nn.Module, _data: Any, _per_image_s: float | None = None,
                 _resume_dir: Path | None = None) -> dict:
    """How long ``_request``'s run will take here (``workflow.estimate_run``, what the CLI announces), with the
    recovery's reference accuracy drop and the budget as it will be spent; once per model and request
    (``request_key`` names the request's target, blocks, recovery, test images and device). For a run that will
    go on from ``_resume_dir`` (``left`` names what the folder holds, for the cache): what is left of it."""
    est = estimate_run(_request, private_copy(_model), _data, per_image_s=_per_image_s, resume_dir=_resume_dir)
    return {**est.to_dict(), "recovery_config": est.request.recovery.to_dict(),
            "recovery_text": est.request.recovery.describe()}


def run_checkpoint_dir(model_key: str, request_key: str) -> Path:
    """Where the Prune page's run of this model and request keeps what it finished (scores, the recovery
    checkpoint; :func:`~cka_analysis.workflow.run_prune`'s ``checkpoint_dir``), so that a run interrupted by a
    cancel or a stopped server goes on from there when the same request is started again: under
    ``$CKA_PRUNE_CACHE``, one folder per model and request (``request_key`` must name everything the run depends
    on, seed included)."""
    digest = hashlib.sha256(f"{model_key}\n{request_key}".encode()).hexdigest()[:20]
    return cache_dir() / "cka-prune" / "dashboard-runs" / digest


#: A run's checkpoint folder untouched this long is removed when another run starts (it was never resumed).
STALE_RUN_DAYS = 14.0


#: The run folders a run of this server process is writing now (every session's): never shared, never removed.
_RUN_DIRS_IN_USE: set[Path] = set()
_RUN_DIRS_LOCK = threading.Lock()


def claim_run_dir(folder: Path) -> bool:
    """Mark ``folder`` as written by the calling run; False when another run of this process holds it."""
    with _RUN_DIRS_LOCK:
        if folder in _RUN_DIRS_IN_USE:
            return False
        _RUN_DIRS_IN_USE.add(folder)
        return True


def release_run_dir(folder: Path) -> None:
    """The run that claimed ``folder`` (:func:`claim_run_dir`) has ended."""
    with _RUN_DIRS_LOCK:
        _RUN_DIRS_IN_USE.discard(folder)


def run_dir_in_use(folder: Path) -> bool:
    """Whether a run of this process is writing ``folder`` now (its checkpoint is live: not a run to go on from)."""
    with _RUN_DIRS_LOCK:
        return folder in _RUN_DIRS_IN_USE


def clear_stale_run_dirs(parent: Path, days: float = STALE_RUN_DAYS, keep: Path | None = None) -> list[Path]:
    """Remove the run folders in ``parent`` (:func:`run_checkpoint_dir`) with nothing written for ``days`` days:
    runs that were cancelled or interrupted and never started again; never ``keep`` (the run about to go on from
    it) or a folder a run is writing. Returns the folders removed."""
    if not parent.is_dir():
        return []
    cutoff = time.time() - days * 86400
    gone = []
    for folder in parent.iterdir():
        if folder == keep or not folder.is_dir() or run_dir_in_use(folder):
            continue
        try:
            stamps = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()] or [folder.stat().st_mtime]
        except OSError:  # removed meanwhile
            continue
        if max(stamps) < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


@st.cache_data(show_spinner=False, max_entries=64)
def further_estimate(run_id: str, budget: str, *, _record: Any, _model: nn.Module, _base: nn.Module, _config: Any,
                     _data: Any, _per_image_s: float | None = None) -> dict:
    """How long recovering run ``run_id`` further with ``budget`` will take (``workflow.estimate_further``: the
    same recovery estimate as a run's)."""
    est = estimate_further(_record, private_copy(_model), private_copy(_base), _config, _data,
                           per_image_s=_per_image_s)
    return {**est.to_dict(), "recovery_config": est.request.recovery.to_dict(),
            "recovery_text": est.request.recovery.describe()}


def cached_job(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Adapt a cached wrapper (``_progress``/``_cancel``) to the job runner's ``progress``/``cancel`` call."""

    def run(*, progress=None, cancel=None) -> Any:
        return fn(*args, **kwargs, _progress=progress, _cancel=cancel)

    return run

