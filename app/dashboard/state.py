"""Session state of the dashboard: the active model and data, the device, results and pruning runs.

Models and datasets are loaded once per process (``st.cache_resource``, keyed by what identifies them: registry
name and weights, or an upload's content hash; data spec and the model's input contract). The session keeps the
active selection in ``st.session_state["active"]`` (a :class:`Active`), computed results in
``st.session_state["results"]`` and pruning runs in ``st.session_state["runs"]``, so everything survives reruns
and page switches. Cached models are shared between sessions and are never modified: every job works on a copy.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import streamlit as st
import torch
from streamlit import config as st_config
from torch import nn

from cka_analysis.blocks import Block, find_blocks
from cka_analysis.choices import DASHBOARD_CALIBRATION_IMAGES
from cka_analysis.data import calibration_subset, check_num_classes, load_dataset, make_loader
from cka_analysis.device import describe_device, resolve_device
from cka_analysis.errors import CKAPruneError
from cka_analysis.export import open_model
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.models import model_entry
from cka_analysis.models.preset import Preset
from cka_analysis.workflow import eval_subset

from . import jobs, uploads

DEMO_MODEL = {"kind": "registry", "name": "digits_resnet", "weights": "demo", "num_classes": None,
              "allow_download": False}
DEMO_DATA = {"kind": "digits", "root": "", "download": False, "n_calib": DASHBOARD_CALIBRATION_IMAGES, "seed": 0}
CALIB_BATCH = 128
EVAL_BATCH = 256
RANDOM_WEIGHTS = "(random initialisation)"
# Work below this many MACs × images starts by itself when a page opens (the digits demo is ~1e9).
AUTO_RUN_BUDGET = 2e10


@dataclass
class Active:
    """The model and data every page works on."""

    model_spec: dict
    data_spec: dict
    model_key: str
    model_label: str
    model: nn.Module
    blocks: list[Block]
    macs: int
    params: int
    data_key: str
    data_label: str
    train: Any
    test: Any
    calib: Any

    @property
    def preset(self) -> Preset:
        return self.model.cka_preset

    @property
    def test_key(self) -> str:
        """The part of ``data_key`` the test split depends on (not the calibration subset)."""
        return self.data_key.split("|n=")[0]

    @property
    def removable(self) -> list[str]:
        return [b.name for b in self.blocks if b.removable]


# ------------------------------------------------------------------------------------------------ cached loading
@st.cache_resource(show_spinner=False, max_entries=8)
def _registry_model(name: str, weights: str | None, num_classes: int | None, allow_download: bool) -> nn.Module:
    # open_model records its provenance (cka_origin) in the model: `cka-prune recover` reopens the original from it
    return open_model(name, weights=weights, num_classes=num_classes, allow_download=allow_download, device="cpu")


FACTORY_ENV = "CKA_PRUNE_MODEL_FACTORY"
EXTERNAL_KINDS = ("timm", "hf", "factory")


def server_factory(argv: list[str] | None = None) -> str | None:
    """The model factory the person who started the server allowed: ``streamlit run app -- --model-factory
    MODULE:FUNCTION`` (the script's own arguments), else ``$CKA_PRUNE_MODEL_FACTORY``; None when neither.

    This is the only way a factory reaches the dashboard: code is never taken from an upload or a URL."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--model-factory" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--model-factory="):
            return arg.split("=", 1)[1]
    return os.environ.get(FACTORY_ENV) or None


def external_source(spec: dict) -> str:
    """The ``timm:``/``hf:``/``factory:`` source string of a model spec; a factory only when it is the server's."""
    kind = spec["kind"]
    if kind == "factory":
        allowed = server_factory()
        if not allowed or spec.get("factory") != allowed:
            raise CKAPruneError("a model factory can only be chosen when the server is started with it "
                                "(`streamlit run app -- --model-factory MODULE:FUNCTION`); code never comes from "
                                "an upload or a URL")
        return f"factory:{allowed}"
    ref = str(spec.get("name", "")).strip()
    if not ref:
        raise CKAPruneError("enter a timm model name" if kind == "timm" else "enter a Hugging Face model directory")
    return f"{kind}:{ref}"


def model_spec_from_query(value: str) -> dict:
    """The model spec a ``?model=`` URL parameter asks for: a registry name, ``timm:NAME`` or ``hf:DIR``.
    A factory is refused (CKAPruneError): a URL must not make the server import code."""
    from cka_analysis.models import available_models

    value = value.strip()
    if value.startswith("factory:"):
        raise CKAPruneError(f"?model={value}: a URL cannot choose a model factory or other code; the person who "
                            "starts the server passes one with `streamlit run app -- --model-factory ...`")
    if value.startswith(("timm:", "hf:")):
        kind, _, name = value.partition(":")
        return {"kind": kind, "name": name, "weights": "random" if kind == "timm" else None, "num_classes": None,
                "allow_download": False, "block_patterns": None}
    if value not in available_models():
        raise CKAPruneError(f"?model={value} is not a registry model, timm:NAME or hf:DIR")
    return {**DEMO_MODEL, "name": value, "weights": None}


@st.cache_resource(show_spinner=False, max_entries=4)
def _external_model(source: str, weights: str | None, num_classes: int | None, patterns: tuple[str, ...] | None,
                    allow_download: bool) -> nn.Module:
    model = open_model(source, weights=weights, num_classes=num_classes, allow_download=allow_download,
                       device="cpu", block_patterns=list(patterns) if patterns else None)
    return model  # open_model set its provenance (cka_origin), block patterns included


@st.cache_resource(show_spinner=False, max_entries=4)
def _checkpoint_model(arch: str, content: str, num_classes: int | None, *, _name: str, _data: bytes) -> nn.Module:
    return uploads.model_from_checkpoint(_name, _data, arch, num_classes)


@st.cache_resource(show_spinner=False, max_entries=4)
def _archive_model(content: str, *, _name: str, _data: bytes) -> nn.Module:
    return uploads.model_from_archive(_name, _data)


def preset_key(preset: Preset) -> str:
    """What the data pipeline depends on in a preset (not where the weights came from)."""
    d = preset.to_dict()
    for k in ("weights", "notes", "arch", "num_classes"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


@st.cache_resource(show_spinner=False, max_entries=16)
def _dataset(spec: str, split: str, pkey: str, augment: bool, download: bool, *, _preset: Preset) -> Any:
    return load_dataset(spec, split, _preset, augment=augment, download=download)


@st.cache_data(show_spinner=False, max_entries=16)
def _model_facts(model_key: str, *, _model: nn.Module) -> tuple[list[Block], int, int]:
    size = tuple(_model.cka_preset.input_size)
    return find_blocks(_model), count_macs(_model, size), count_params(_model)


def data_spec_string(spec: dict) -> str:
    kind = spec["kind"]
    return kind if kind == "digits" else f"{kind}:{spec['root'].strip()}" if spec["root"].strip() else kind


def model_key_and_label(spec: dict) -> tuple[str, str]:
    if spec["kind"] == "registry":
        w = spec.get("weights")
        wl = "random weights" if w is None else f"{w} weights"
        nc = spec.get("num_classes")
        return (f"registry:{spec['name']}:{w}:{nc}",
                f"{spec['name']} ({wl}{f', {nc} classes' if nc else ''})")
    if spec["kind"] == "checkpoint":
        return (f"checkpoint:{spec['arch']}:{spec['digest']}:{spec.get('num_classes')}",
                f"{spec['arch']} + {spec['file_name']}")
    if spec["kind"] in EXTERNAL_KINDS:
        source = external_source(spec)
        patterns = spec.get("block_patterns")
        w = spec.get("weights")
        return (f"{source}|{w}|{spec.get('num_classes')}|{patterns}",
                f"{source} ({'own' if w is None else w} weights{', blocks chosen by hand' if patterns else ''})")
    return f"archive:{spec['digest']}", f"saved model {spec['file_name']}"


def load_model(spec: dict, upload: tuple[str, bytes] | None = None) -> nn.Module:
    """The (cached) model a spec names; uploads need their ``(file name, bytes)``."""
    if spec["kind"] == "registry":
        return _registry_model(spec["name"], spec.get("weights"), spec.get("num_classes"),
                               bool(spec.get("allow_download")))
    if spec["kind"] in EXTERNAL_KINDS:
        patterns = spec.get("block_patterns")
        return _external_model(external_source(spec), spec.get("weights"), spec.get("num_classes"),
                               tuple(patterns) if patterns else None, bool(spec.get("allow_download")))
    if upload is None:
        raise CKAPruneError("choose a file to upload first")
    name, data = upload
    if spec["kind"] == "checkpoint":
        return _checkpoint_model(spec["arch"], spec["digest"], spec.get("num_classes"), _name=name, _data=data)
    return _archive_model(spec["digest"], _name=name, _data=data)


def activate(model_spec: dict, data_spec: dict, upload: tuple[str, bytes] | None = None) -> Active:
    """Load a model and its data, check that they fit, and make them the session's active selection.

    Raises CKAPruneError (shown by the page) and leaves the previous selection untouched on failure.
    """
    if upload is not None and model_spec["kind"] not in ("registry", *EXTERNAL_KINDS):
        model_spec = {**model_spec, "digest": uploads.digest(upload[1]), "file_name": upload[0]}
    model = load_model(model_spec, upload)
    model_key, model_label = model_key_and_label(model_spec)
    preset = model.cka_preset
    spec = data_spec_string(data_spec)
    pkey = preset_key(preset)
    download = bool(data_spec.get("download"))
    train = _dataset(spec, "train", pkey, False, download, _preset=preset)
    test = _dataset(spec, "test", pkey, False, download, _preset=preset)
    check_num_classes(train, preset.num_classes)
    n, seed = int(data_spec["n_calib"]), int(data_spec.get("seed", 0))
    calib = calibration_subset(train, n, seed=seed)
    blocks, macs, params = _model_facts(model_key, _model=model)
    data_key = f"{spec}|{pkey}|n={n}|seed={seed}"
    active = Active(model_spec, dict(data_spec), model_key, model_label, model, blocks, macs, params, data_key,
                    f"{spec} ({len(train):,} train / {len(test):,} test images, {n} calibration)", train, test,
                    calib)
    previous: Active | None = st.session_state.get("active")
    st.session_state["active"] = active
    if previous is None or previous.model_key != model_key or previous.data_key != data_key:
        st.session_state["results"] = {}
        st.session_state["runs"] = []
        st.session_state["exports"] = {}
    return active


def ensure_default() -> Active | None:
    """Activate the bundled digits demo on a session's first run."""
    if "active" not in st.session_state:
        st.session_state.setdefault("results", {})
        st.session_state.setdefault("runs", [])
        st.session_state.setdefault("exports", {})
        with guard("loading the digits demo") as g:
            activate(dict(DEMO_MODEL), dict(DEMO_DATA))
        if g.failed:
            return None
    return st.session_state.get("active")


def apply_query_model() -> None:
    """Open the model a ``?model=`` URL parameter names (once per value and session), with the demo data; a
    factory or anything else the URL may not choose is refused with a message (see :func:`model_spec_from_query`)."""
    value = st.query_params.get("model")
    if not value or st.session_state.get("query_model_done") == value:
        return
    st.session_state["query_model_done"] = value
    with guard(f"opening ?model={value}"):
        a = active()
        activate(model_spec_from_query(value), dict(a.data_spec) if a else dict(DEMO_DATA))


def active() -> Active | None:
    return st.session_state.get("active")


def require_active() -> Active:
    """The active selection, or stop the page with a pointer to the first page."""
    a = active()
    if a is None:
        st.warning("No model is loaded yet: choose one on the **Model & data** page.")
        st.stop()
    return a


def describe_model(a: Active) -> str:
    source = getattr(a.model, "cka_source", None)
    if source is not None:
        return {"timm": "a timm model", "hf": "a Hugging Face image classifier",
                "factory": "a model built by the server's factory function"}[source["kind"]]
    return model_entry(a.preset.arch).description


# ------------------------------------------------------------------------------------------------ loaders
def calib_loader(a: Active) -> Any:
    return make_loader(a.calib, batch_size=CALIB_BATCH, shuffle=False, seed=int(a.data_spec.get("seed", 0)))


def test_loader(a: Active, samples: int | None = None) -> Any:
    """The test split, or its "N test images" (``samples``): the class-balanced seeded subset the CLI and the
    workflow use (:func:`cka_analysis.workflow.eval_subset`), so the same N gives the same accuracy everywhere."""
    subset = eval_subset(a.test, samples, int(a.data_spec.get("seed", 0)))
    return make_loader(subset, batch_size=EVAL_BATCH, shuffle=False)


def train_augmented(a: Active) -> Any:
    """The training split with the training augmentation (what recovery trains on; it builds its own loader)."""
    spec = data_spec_string(a.data_spec)
    return _dataset(spec, "train", preset_key(a.preset), True, bool(a.data_spec.get("download")), _preset=a.preset)


def small_work(a: Active, images: int) -> bool:
    """Cheap enough to start without a click (the digits demo on a CPU)."""
    return a.macs * images <= AUTO_RUN_BUDGET


# ------------------------------------------------------------------------------------------------ device
THREADS_ENV = "CKA_PRUNE_DASHBOARD_THREADS"


def compute_threads() -> int:
    """Torch threads for the dashboard's work: ``$CKA_PRUNE_DASHBOARD_THREADS``, else ``$OMP_NUM_THREADS``, else
    every core but one. The server and the browser need a core: OpenMP threads that share theirs wait for each
    other at every operator (on a 2-core machine with other processes running, the demo's robustness measurement
    took 21 s with two threads, 3.9 s with one), which also made every time estimate wrong."""
    for env in (THREADS_ENV, "OMP_NUM_THREADS"):
        raw = os.environ.get(env, "").strip()
        if raw:
            try:
                return max(1, int(raw))
            except ValueError:
                raise ValueError(f"{env}={raw!r} must be a positive integer (torch threads)") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def configure_threads() -> int:
    """Set the process's torch threads to :func:`compute_threads` (every later thread, the jobs' included,
    starts with it); returns the number."""
    n = compute_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


#: Streamlit's option that runs a full ``gc.collect(2)`` after every script run, fragment reruns included.
POST_SCRIPT_GC = "runner.postScriptGC"


def configure_gc() -> bool:
    """Keep Python's garbage collector off the jobs' critical path; True the first time it acts in a process.

    Streamlit collects all generations after every script run (``runner.postScriptGC``), and a running job's
    progress box is a fragment that reruns every ``jobs.POLL_SECONDS``. With torch, streamlit and plotly
    imported, one full collection walks about 500,000 objects: 0.6 s with the GIL held on the 2-core machine,
    so while a job ran the collector took more than half the time (py-spy on the server: 59 % of the samples
    in ``_on_script_finished``) and jobs ran 4–6× slower in the browser than in AppTest, where nothing polls.
    So the option is switched off here (``.streamlit/config.toml`` says so too, for ``streamlit run app`` from
    the repository root; this covers other launchers) and everything alive after the imports and the first
    model load is moved to the collector's permanent generation (``gc.freeze``): modules and cached models live
    as long as the process, and the collections Python still runs by itself no longer walk them.
    """
    if st_config.get_option(POST_SCRIPT_GC):
        st_config.set_option(POST_SCRIPT_GC, False, where_defined="app/dashboard/state.py (configure_gc)")
    if gc.get_freeze_count() > 0:
        return False
    gc.freeze()  # no collection first: after the imports it finds about 20 objects and costs 0.4-1 s
    return True


def device_options() -> list[str]:
    opts = ["auto", "cpu"]
    if torch.cuda.is_available():
        opts += [f"cuda:{i}" if torch.cuda.device_count() > 1 else "cuda" for i in range(torch.cuda.device_count())]
    backend = getattr(torch.backends, "mps", None)
    if backend is not None and backend.is_available():
        opts.append("mps")
    return opts


def device() -> str:
    """The resolved device (``cpu``, ``cuda``, ...) chosen in the sidebar."""
    choice = st.session_state.get("device_choice", "auto")
    try:
        return str(resolve_device(choice))
    except CKAPruneError:
        return "cpu"


def device_description() -> str:
    return describe_device(torch.device(device()))


# ------------------------------------------------------------------------------------------------ results & runs
def results() -> dict:
    return st.session_state.setdefault("results", {})


def result(kind: str, key: Any) -> Any:
    return results().get(kind, {}).get(_k(key))


def store(kind: str, key: Any, value: Any) -> None:
    results().setdefault(kind, {})[_k(key)] = value


def _k(key: Any) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def log_timing(action: str, label: str, estimate: float | None, seconds: float) -> None:
    """Keep what an action was estimated to take and what it took (``st.session_state["timings"]``, newest last):
    every estimate the pages show can be checked against the truth (``benchmarks/estimates.py`` does)."""
    st.session_state.setdefault("timings", []).append(
        {"action": action, "label": label, "estimated_seconds": estimate, "seconds": seconds})


def runs() -> list[dict]:
    return st.session_state.setdefault("runs", [])


def new_run_id() -> str:
    """Unique across sessions: cached measurements of a pruned model are keyed by it."""
    return uuid.uuid4().hex[:10]


def run_key(a: Active, run: dict) -> str:
    return f"{a.model_key}|run:{run['id']}"


def model_choices(a: Active) -> list[dict]:
    """The original model and every pruning run, as ``{"key", "label", "model", "run"}`` dicts."""
    out = [{"key": a.model_key, "label": "original", "model": a.model, "run": None}]
    for r in runs():
        out.append({"key": run_key(a, r), "label": r["label"], "model": r["model"], "run": r})
    return out


# ------------------------------------------------------------------------------------------------ errors
class _Guard:
    failed = False
    error: str | None = None


@contextlib.contextmanager
def guard(what: str) -> Iterator[_Guard]:
    """Show a user error, an out-of-memory or an unexpected exception in the page instead of crashing it.

    Streamlit's own control flow (st.rerun, st.stop) passes through: those are BaseExceptions.
    """
    g = _Guard()
    try:
        yield g
    except CKAPruneError as exc:
        g.failed, g.error = True, str(exc)
        st.error(str(exc))
    except Exception as exc:
        g.failed = True
        if jobs.is_oom(exc):
            g.error = jobs.OOM_HINT.format(what=f" while {what}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            st.error(g.error)
        else:
            g.error = f"{type(exc).__name__}: {exc}"
            st.error(f"Unexpected error while {what}: {g.error}. The session is still usable.")
            with st.expander("Error details"):
                st.exception(exc)
