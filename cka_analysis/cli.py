"""The ``cka-prune`` command line (also ``python -m cka_analysis``, also under ``torchrun``).

Every command takes ``--device auto|cpu|cuda`` and ``--debug``; progress goes to stderr, results to stdout or the
files named with ``--json``/``--out``. A mistake the user can fix (unknown model, missing folder, a target that
cannot be met, ...) ends the command with exit code 2 and one line saying what is wrong; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._version import __version__
from .choices import (
    CRITERIA,
    CRITERION_INFO,
    DEEP_CRITERION,
    DEEP_TARGET,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CAPACITY_WEIGHT,
    DEFAULT_RECOVERY_METHOD,
    RECOVERY_METHODS,
    ROBUSTNESS_KINDS,
    parse_reduction,
    plan_advice,
)
from .errors import ConfigError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

_MODEL_HELP = ("a registry name (see `cka-prune models`), timm:NAME (a timm model, the timm extra), hf:DIR_OR_ID (a "
               "Hugging Face image classifier, the hf extra), or a directory written by `cka-prune prune/finetune`")
_DATA_HELP = "digits | cifar10[:ROOT] | cifar100[:ROOT] | imagefolder:ROOT (ROOT holds train/ and test/ or val/)"


# ---------------------------------------------------------------------------------------------------------------
# Progress on stderr
# ---------------------------------------------------------------------------------------------------------------


class _LineStream:
    """stderr for logs: each bar refresh on a line of its own instead of carriage returns."""

    def __init__(self) -> None:
        self._last = ""

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            if line.strip() and line != self._last:  # tqdm redraws the final state when it closes
                sys.stderr.write(line + "\n")
                self._last = line

    def flush(self) -> None:
        sys.stderr.flush()


class StderrProgress:
    """A ``progress(done, total, message)`` callback drawing tqdm bars (rate and time left) on stderr.

    A new bar starts whenever the total changes (a new phase: decoding, scoring, recovery, ...); messages without
    a total are status lines. On a terminal bars redraw in place; in logs (not a terminal) tqdm refreshes at most
    every ``interval`` seconds. Silent on ranks other than 0 and with ``--quiet``.
    """

    def __init__(self, enabled: bool = True, interval: float = 2.0) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = interval if not self.tty else 0.1
        self._bar = None
        self._total: int | None = None

    def __call__(self, done: int, total: int | None, message: str) -> None:
        if not self.enabled:
            return
        if not total:
            self.info(message)
            return
        if self._bar is None or total != self._total or done < self._bar.n:
            self.newline()
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr if self.tty else _LineStream(), leave=True, delay=0.5,
                             mininterval=self.interval, dynamic_ncols=self.tty, ncols=None if self.tty else 120,
                             bar_format="{percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} "
                                        "[{elapsed}<{remaining}] {desc}")
            self._total = total
        self._bar.set_description_str(message[:80], refresh=False)
        self._bar.update(max(0, min(done, total) - self._bar.n))
        if done >= total:
            self.newline()

    def newline(self) -> None:
        """Finish the current bar (it stays on screen)."""
        if self._bar is not None:
            self._bar.close()
            self._bar, self._total = None, None

    def info(self, message: str) -> None:
        """A status line (always on its own line)."""
        if self.enabled:
            self.newline()
            sys.stderr.write(message + "\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    """A reduction as 0.5, 50% or 50 (percent when > 1): :func:`~cka_analysis.choices.parse_reduction`."""
    try:
        v = parse_reduction(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction between 0 and 1 (e.g. 0.5 or 50%)")
    return v


def _bounded(kind: type, minimum: float, what: str):
    """An argparse type: a number of ``kind`` that is at least ``minimum``."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from exc
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be ≥ {minimum}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_positive_int = _bounded(int, 1, "a whole number")
_non_negative_float = _bounded(float, 0, "a number")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N")
    g.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    g.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    g.add_argument("--num-workers", type=int, default=None, metavar="K",
                   help="data-loading worker processes (default: 0 for in-memory data, else up to 4)")


def _model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    if positional:
        p.add_argument("model", metavar="MODEL_OR_DIR", help=_MODEL_HELP + "; or factory:MODULE:FUNCTION")
    else:
        p.add_argument("--model", metavar="M", help=_MODEL_HELP + " (this or --model-factory is required)")
        p.add_argument("--model-factory", metavar="MODULE:FUNCTION", default=None,
                       help="your own model: package.module:function or path/to/file.py:function returning the "
                            "nn.Module (with a preset attached); its residual blocks are found automatically")
    p.add_argument("--block-pattern", metavar="PATTERNS", default=None,
                   help="timm:, hf: and factory: models: the residual blocks as comma-separated module names or "
                        "glob patterns (e.g. 'encoder.layer.*'), instead of the blocks found automatically")
    p.add_argument("--weights", metavar="W", default=None,
                   help="checkpoint file (.pt/.pth/.th loaded with weights_only=True, or .safetensors), a named "
                        "source (e.g. DEFAULT, cifar10, cifar10jpeg, demo), or 'random' for random initialisation "
                        "on purpose. Without it a registry model gets its default named weights (said on stderr); "
                        "one without defaults is refused. Not with a saved directory. timm: models need it (a file, a timm "
                        "tag such as in1k where the hub can be reached, or random); hf: directories bring their own")
    p.add_argument("--num-classes", type=_positive_int, default=None, metavar="K",
                   help="output classes when they differ from the architecture's default")


def _data_args(p: argparse.ArgumentParser, *, samples_help: str, samples_default: int | None) -> None:
    p.add_argument("--data", required=True, metavar="D", help=_DATA_HELP)
    p.add_argument("--download", action="store_true", help="allow downloading CIFAR into ROOT when missing")
    p.add_argument("--samples", type=_positive_int, default=samples_default, metavar="N", help=samples_help)
    p.add_argument("--batch-size", type=_positive_int, default=128, metavar="B", help="batch size (default 128)")
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default="none",
                   help="autocast the forward passes on CUDA (CKA and scores stay in float32/float64)")


def _criterion_args(p: argparse.ArgumentParser, criteria: Sequence[str]) -> None:
    described = "; ".join(f"{c}: {CRITERION_INFO[c].description}" for c in criteria)
    p.add_argument("--criterion", choices=criteria, default="cka",
                   help="removal criterion, lower score = safer to remove (default cka; for deep cuts of "
                        f"≥ {100 * DEEP_TARGET:.0f} %% fewer MACs {DEEP_CRITERION} is recommended: it kept the most "
                        f"accuracy after recovery on the validation split). {described}")
    p.add_argument("--debiased", action="store_true", help="debiased linear CKA for the cka criterion")
    p.add_argument("--capacity-weight", type=_non_negative_float, default=DEFAULT_CAPACITY_WEIGHT, metavar="A",
                   help="the knob of the cka_capacity criterion: its score is the cka score × (block parameters / "
                        f"mean block parameters)^A (default {DEFAULT_CAPACITY_WEIGHT:g}; 0 = plain cka order)")


def _add_models(sub: Any) -> None:
    """The ``models`` command's arguments."""
    p = sub.add_parser("models", help="list the model registry with removable blocks and MACs",
                       description="List every registry model with its input size, named weights, removable "
                                   "blocks and MACs (multiply-accumulates for one image).")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON ('-' for stdout)")
    _common(p)


def _add_heatmap(sub: Any) -> None:
    """The ``heatmap`` command's arguments."""
    p = sub.add_parser("heatmap", help="layer × layer CKA heatmap of a model (or model vs model)",
                       description="Layer × layer CKA between the stem, every residual block output and the "
                                   "pooled features, over test images. With --compare, model vs another model "
                                   "(e.g. original vs pruned).")
    _model_args(p)
    _data_args(p, samples_help="class-balanced images to use (default 1000)", samples_default=1000)
    p.add_argument("--compare", metavar="MODEL_OR_DIR", help="second model (same registry rules) for A×B CKA")
    p.add_argument("--compare-weights", metavar="W", help="weights of the --compare model")
    p.add_argument("--kernel", choices=("linear", "rbf"), default="linear", help="CKA kernel (default linear)")
    p.add_argument("--biased", action="store_true", help="biased HSIC (default: unbiased minibatch CKA)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="which split (default test)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help=".json (matrix and names), .html (interactive plotly) or .png (needs kaleido)")
    _common(p)


def _add_score(sub: Any) -> None:
    """The ``score`` command's arguments."""
    p = sub.add_parser("score", help="removal score of every removable block (lower = safer to remove)",
                       description="Score every removable block on calibration images from the training split. "
                                   "The paper's criterion is cka: 1 − linear CKA between the penultimate "
                                   "features with and without the block.")
    _model_args(p)
    _data_args(p, samples_help=f"calibration images from the training split (default {DEFAULT_CALIBRATION_IMAGES})",
               samples_default=DEFAULT_CALIBRATION_IMAGES)
    _criterion_args(p, CRITERIA)
    p.add_argument("--seed", type=int, default=0, help="calibration sample and random-criterion seed")
    p.add_argument("--json", metavar="FILE",
                   help="write {criterion, samples, seconds, scores, options, model, seed, latency} ('-' for stdout)")
    _common(p)


def _add_prune(sub: Any) -> None:
    """The ``prune`` command's arguments."""
    p = sub.add_parser("prune", help="remove blocks (by hand or to a target), recover the accuracy, save",
                       description="Remove residual blocks chosen by hand or by a criterion until a target is "
                                   "met (one-shot or iterative as in the paper), recover the accuracy within a "
                                   "budget of training images (--recovery), and write the pruned model (loadable "
                                   "with load_pruned) and report.json to --out. Bad input (an unknown block, a "
                                   "target out of reach) is refused before anything is scored or written.")
    _model_args(p)
    _data_args(p, samples_help=f"calibration images from the training split (default {DEFAULT_CALIBRATION_IMAGES})",
               samples_default=DEFAULT_CALIBRATION_IMAGES)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--blocks", metavar="A,B", help="comma-separated block names to remove")
    how.add_argument("--target-macs-reduction", type=_fraction, metavar="X",
                     help="remove blocks until MACs drop by at least X (0.5 or 50%%)")
    how.add_argument("--target-params-reduction", type=_fraction, metavar="X",
                     help="remove blocks until parameters drop by at least X")
    how.add_argument("--target-latency-reduction", type=_fraction, metavar="X",
                     help="remove blocks until the latency predicted from measured per-block costs (batch "
                          "--latency-batch-size on --device, cached) drops by at least X; the pruned model is "
                          "then timed and report.json records predicted vs measured")
    how.add_argument("--remove", type=_positive_int, metavar="N", help="remove N blocks")
    p.add_argument("--latency-batch-size", type=_positive_int, default=1, metavar="B",
                   help="batch size the latency target is measured and checked at (default 1)")
    _criterion_args(p, CRITERIA)
    p.add_argument("--iterative", action="store_true",
                   help="rescore after each removal, as in the paper; the recovery budget is shared between a "
                        "short recovery after each removal and the final one")
    _recovery_args(p, "quick")
    p.add_argument("--eval-samples", type=_positive_int, default=None, metavar="N",
                   help="evaluate on N class-balanced test images (default: the whole test split)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for calibration, the test subset, recovery's data order and random scores")
    p.add_argument("--out", default="pruned", metavar="DIR", help="output directory (default ./pruned)")
    p.add_argument("--resume", action="store_true",
                   help="go on from what an interrupted run left in --out (OUT/.resume/: its scores and recovery "
                        "checkpoint; the estimate is then for what is left, and the report's times include the "
                        "training before the interruption)")
    _common(p)


def _add_finetune(sub: Any) -> None:
    """The ``finetune`` command's arguments."""
    p = sub.add_parser("finetune", help="fine-tune a model (pruned or not) and save it",
                       description="Fine-tune MODEL_OR_DIR with SGD + cosine schedule (optionally distilling "
                                   "from a teacher) and save it to --out (a directory load_pruned reads). Runs "
                                   "unchanged under torchrun --nproc_per_node=K -m cka_analysis finetune ...")
    _model_args(p, positional=True)
    p.add_argument("--data", required=True, metavar="D", help=_DATA_HELP)
    p.add_argument("--download", action="store_true", help="allow downloading CIFAR into ROOT when missing")
    p.add_argument("--epochs", type=_non_negative_float, default=1.0, metavar="E", help="epochs (default 1)")
    p.add_argument("--steps", type=int, default=None, metavar="S", help="budget in optimiser steps instead")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default 0.01)")
    p.add_argument("--batch-size", type=_positive_int, default=128, metavar="B",
                   help="global batch size, split across processes under torchrun (default 128)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing (default 0)")
    p.add_argument("--schedule", choices=("cosine", "onecycle", "constant"), default="cosine")
    p.add_argument("--no-augment", action="store_true",
                   help="train without the random crop/flip augmentation (deterministic batches)")
    p.add_argument("--distill-from", metavar="MODEL", help="teacher: registry name or saved directory")
    p.add_argument("--distill-weights", metavar="W", help="weights of the teacher")
    p.add_argument("--eval-samples", type=_positive_int, default=None, metavar="N",
                   help="evaluate on N class-balanced test images (default: the whole test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint an interrupted run left")
    _common(p)


def _recovery_args(p: argparse.ArgumentParser, default: str, *, method_default: str | None = DEFAULT_RECOVERY_METHOD,
                   method_note: str = f"default {DEFAULT_RECOVERY_METHOD}") -> None:
    p.add_argument("--recovery", default=default, metavar="R",
                   help="recovery budget in training images: quick (25,000), standard (250,000), long "
                        "(2,500,000: about 50 epochs of CIFAR-10; hours on a CPU), none, or a number (default "
                        f"{default}); the expected time is said before it starts")
    p.add_argument("--recovery-method", default=method_default, choices=list(RECOVERY_METHODS),
                   help="how to recover: " + "; ".join(f"{k}: {v}" for k, v in RECOVERY_METHODS.items())
                        + f" ({method_note})")


def _add_recover(sub: Any) -> None:
    """The ``recover`` command's arguments."""
    p = sub.add_parser("recover", help="recover a pruned model further (another budget, no re-pruning)",
                       description="Spend another recovery budget on a directory written by `cka-prune prune`: "
                                   "distillation from the original model named in its report, on the same data "
                                   "and test images; writes a new directory with the updated record (the "
                                   "dashboard's Compare page does the same).")
    p.add_argument("model", metavar="DIR", help="a directory written by cka-prune prune")
    _recovery_args(p, "standard", method_default=None,
                   method_note="default: the run's own recipe, method included, from its report")
    p.add_argument("--original", metavar="MODEL", help="the unpruned model (default: the one its record names)")
    p.add_argument("--original-weights", metavar="W", help="weights of --original")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    _common(p)


def _add_evaluate(sub: Any) -> None:
    """The ``evaluate`` command's arguments."""
    p = sub.add_parser("evaluate", help="accuracy, MACs, params, latency (and robustness) of a model",
                       description="Evaluate MODEL_OR_DIR on the test split: top-1 (top-5 above 10 classes), "
                                   "MACs, parameters and latency; with --robustness also FGSM/PGD accuracy "
                                   "(ε in pixel units of [0, 1]) and common-corruption accuracy.")
    _model_args(p, positional=True)
    _data_args(p, samples_help="class-balanced test images (default: the whole split)", samples_default=None)
    p.add_argument("--robustness", metavar="KINDS",
                   help=f"comma-separated subset of {','.join(ROBUSTNESS_KINDS)}")
    p.add_argument("--eps", default="1/255,2/255,4/255,8/255", metavar="LIST",
                   help="ε values for fgsm/pgd, decimals or fractions (default 1/255,2/255,4/255,8/255)")
    p.add_argument("--pgd-steps", type=_positive_int, default=10, help="PGD iterations (default 10)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--seed", type=int, default=0, help="seed for PGD starts and noise corruptions")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    _common(p)


def _add_export(sub: Any) -> None:
    """The ``export`` command's arguments."""
    p = sub.add_parser("export", help="export a saved model to safetensors, .pt2 or ONNX",
                       description="Export a directory written by prune/finetune for deployment.")
    p.add_argument("model", metavar="DIR", help="a directory written by `cka-prune prune` or `finetune`")
    p.add_argument("--format", required=True, choices=("safetensors", "pt2", "onnx"),
                   help="safetensors: a copy of the directory; pt2: torch.export; onnx: checked with onnxruntime")
    p.add_argument("--out", metavar="PATH", help="output file or directory (default: inside DIR)")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cka-prune",
        description="Make residual networks shallower: remove whole blocks chosen with Centered Kernel "
                    "Alignment (Pons et al., ICPR 2024). MACs are multiply-accumulates (= FLOPs/2, what the "
                    "pruning literature calls FLOPs).",
        epilog="Run `cka-prune COMMAND --help` for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"cka-prune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_models, _add_heatmap, _add_score, _add_prune, _add_recover, _add_finetune, _add_evaluate,
                _add_export):
        add(sub)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Helpers shared by the commands
# ---------------------------------------------------------------------------------------------------------------


def _write_json(target: str, payload: Any) -> None:
    from .export import jsonable

    text = json.dumps(jsonable(payload), indent=2)
    if target == "-":
        print(text)
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _model_source(args: argparse.Namespace) -> str:
    """What ``--model`` / ``--model-factory`` name (exactly one of them)."""
    from .errors import ConfigError

    factory = getattr(args, "model_factory", None)
    if factory and args.model:
        raise ConfigError("give either --model or --model-factory, not both")
    if factory:
        return f"factory:{factory}"
    if not args.model:
        raise ConfigError("--model (a registry name, timm:NAME, hf:DIR or a saved directory) or --model-factory "
                          "MODULE:FUNCTION is required")
    return args.model


def _open_args(args: argparse.Namespace):
    """The model the command's ``--model``/``--model-factory``, ``--weights``, ``--num-classes`` and
    ``--block-pattern`` name (see :func:`_open`)."""
    return _open(_model_source(args), args.weights, args.num_classes, getattr(args, "block_pattern", None))


def _open(source: str, weights: str | None, num_classes: int | None = None, block_patterns: str | None = None):
    """Open ``--model``/``--weights``; never random weights unless the user wrote ``--weights random``.

    Without ``--weights`` a registry model gets its default named weights (one line on stderr says which, and
    what else exists); an architecture without fitting defaults is a usage error naming the choices. A timm model
    needs ``--weights`` (a file, a timm tag, or random); a Hugging Face directory brings its own weights.
    """
    from .errors import ConfigError
    from .export import open_model
    from .models import available_models, default_weights, describe_weight_choices, model_entry

    if weights is None and source.startswith("timm:"):
        raise ConfigError(f"--weights is required for {source}: a weights file (.safetensors, .pth), a timm "
                          "pretrained tag where the hub can be reached (e.g. pretrained, in1k), or random")

    if weights is None and source in available_models():
        weights = default_weights(source, num_classes)
        choices = describe_weight_choices(source)
        if weights is None:
            classes = ""
            entry = model_entry(source)
            if num_classes is not None and entry.default_weights:
                fixed = entry.weights[entry.default_weights].num_classes
                classes = f" fitting --num-classes {num_classes} (its default {entry.default_weights!r} has {fixed} classes)"
            raise ConfigError(f"--weights is required for {source}: no default weights{classes} ({choices})")
        from .distributed import is_main_process

        if is_main_process():
            print(f"note: no --weights given: using {source}'s default weights {weights!r} ({choices})",
                  file=sys.stderr)
    # open_model sets cka_origin (what reopens it: cka-prune recover reopens the original named in a record)
    model = open_model(source, weights=weights, num_classes=num_classes, block_patterns=block_patterns)
    found = getattr(model, "cka_candidates", None)
    if found:
        from .distributed import is_main_process

        if is_main_process():
            print(f"note: {len(found)} residual blocks found in {source} ({found[0].name} ... {found[-1].name}); "
                  "name them yourself with --block-pattern", file=sys.stderr)
    return model


def _amp(args: argparse.Namespace):
    """The autocast dtype for ``--amp`` (None for "none")."""
    from .device import amp_dtype

    return amp_dtype(args.amp)


def _dataset(args: argparse.Namespace, model, split: str, *, augment: bool = False, bar=None,
             whole: bool = True):
    """One split for the model's preset. ``whole``: every image will be read (decode an image folder into
    memory once); otherwise files are read when used (a subset of a large folder)."""
    from .data import check_num_classes, load_dataset, parse_data_spec

    spec = parse_data_spec(args.data)
    in_memory = spec.kind == "imagefolder" and whole
    ds = load_dataset(spec, split, model.cka_preset, augment=augment, download=args.download,
                      in_memory=in_memory, progress=bar)
    check_num_classes(ds, model.cka_preset.num_classes)
    return ds


def _subset(args: argparse.Namespace, dataset, n: int | None):
    """The "n test images" of every accuracy (:func:`~cka_analysis.workflow.eval_subset`: class-balanced, seeded;
    all of them when n is None or not smaller): the same images as the dashboard's and a pruning run's."""
    from .workflow import eval_subset

    return eval_subset(dataset, n, getattr(args, "seed", 0))


def _loader(args: argparse.Namespace, dataset, *, shuffle: bool = False, batch_size: int | None = None,
            device=None):
    from .data import make_loader

    return make_loader(dataset, batch_size=batch_size or args.batch_size, shuffle=shuffle,
                       seed=getattr(args, "seed", 0), num_workers=args.num_workers, device=device)


def _calibration(args: argparse.Namespace, model, bar):
    from .data import calibration_subset

    train = _dataset(args, model, "train", bar=bar, whole=False)
    return calibration_subset(train, args.samples, seed=args.seed)


def _fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace, bar: StderrProgress) -> int:
    import torch

    from .blocks import find_blocks
    from .metrics import count_macs, count_params
    from .models import available_models, build_model, weight_names

    rows = []
    for name in available_models():
        bar(0, None, f"building {name}")
        # shapes are all that counting needs: build on the meta device (no memory, no weight init)
        with torch.device("meta"):
            model = build_model(name)
            blocks = find_blocks(model)
            preset = model.cka_preset
            macs = count_macs(model, preset.input_size)
        rows.append({
            "name": name,
            "input_size": list(preset.input_size),
            "classes": preset.num_classes,
            "blocks": len(blocks),
            "removable": sum(b.removable for b in blocks),
            "macs": macs,
            "params": count_params(model),
            "weights": weight_names(name),
        })
    bar.newline()
    header = f"{'model':<18}{'input':<14}{'classes':>8}{'removable':>12}{'MACs':>12}{'params':>12}  named weights"
    print(header)
    for r in rows:
        size = "×".join(str(v) for v in r["input_size"])
        print(f"{r['name']:<18}{size:<14}{r['classes']:>8}{r['removable']:>6}/{r['blocks']:<5}"
              f"{_fmt_int(r['macs']):>12}{_fmt_int(r['params']):>12}  {', '.join(r['weights']) or '-'}")
    print("MACs = multiply-accumulates per image (FLOPs/2, what the pruning literature calls FLOPs).")
    if args.json:
        _write_json(args.json, rows)
    return 0


def cmd_heatmap(args: argparse.Namespace, bar: StderrProgress) -> int:
    from .cka import CKAOptions, cka_matrix
    from .errors import ConfigError

    out = Path(args.out)
    if out.suffix.lower() not in (".json", ".html", ".png"):
        raise ConfigError(f"--out {out} must end in .json, .html or .png")
    if out.suffix.lower() in (".html", ".png"):
        import importlib.util

        if importlib.util.find_spec("plotly") is None:
            raise ConfigError(f"--out {out.name} needs plotly: pip install 'cka-prune[app]' (or write .json)")
    if out.suffix.lower() == ".png":
        try:
            import kaleido  # noqa: F401
        except ImportError as exc:
            raise ConfigError("--out .png needs the kaleido package (pip install kaleido); use .html or .json")\
                from exc
    from . import distributed as dist_utils

    dev = dist_utils.init_from_env(args.device)
    model = _open_args(args)
    other = _open(args.compare, args.compare_weights) if args.compare else None
    ds = _dataset(args, model, args.split, bar=bar, whole=False)
    ds = _subset(args, ds, args.samples)
    samples = len(ds)
    ws = dist_utils.world_size()
    if ws > 1:
        # under torchrun each rank takes every K-th image; the HSIC sums are all-reduced before the division
        loader = dist_utils.make_loader_for_world(ds, global_batch_size=args.batch_size * ws, shuffle=False,
                                                  num_workers=args.num_workers or 0, device=dev)
    else:
        loader = _loader(args, ds, device=dev)
    options = CKAOptions(kernel=args.kernel, debiased=not args.biased, device=dev, amp=_amp(args))
    result = cka_matrix(model, loader, model_b=other, options=options, progress=bar,
                        reducer=dist_utils.all_reduce_cka if ws > 1 else None)
    bar.newline()
    if not dist_utils.is_main_process():
        return 0
    if out.suffix.lower() == ".json":
        _write_json(str(out), {
            "model": args.model, "compare": args.compare, "kernel": args.kernel, "debiased": not args.biased,
            "samples": samples, "layers_a": result.names_a, "layers_b": result.names_b,
            "matrix": result.matrix.tolist(),
        })
    else:
        from .figures import cka_heatmap

        title = f"{args.kernel} CKA, {samples} images" + (f": {args.model} vs {args.compare}" if other else "")
        # matrix[i, j] compares names_a[i] (rows, y) with names_b[j] (columns, x)
        fig = cka_heatmap(result.matrix, result.names_b, result.names_a, title=title)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".html":
            fig.write_html(str(out), include_plotlyjs="cdn")
        else:
            fig.write_image(str(out))
    print(f"wrote {out} ({len(result.names_a)}×{len(result.names_b)} layers, {samples} images)")
    return 0


def cmd_score(args: argparse.Namespace, bar: StderrProgress) -> int:
    from . import distributed as dist_utils
    from .blocks import find_blocks
    from .scoring import ScoringOptions, score_blocks

    dev = dist_utils.init_from_env(args.device)  # under torchrun the ranks share the calibration images
    model = _open_args(args)
    calib = _calibration(args, model, bar) if CRITERION_INFO[args.criterion].needs_data else None
    options = ScoringOptions(debiased=args.debiased, batch_size=args.batch_size, device=dev, amp=_amp(args),
                             seed=args.seed, capacity_weight=args.capacity_weight)
    scores = score_blocks(model, calib, args.criterion, options=options, progress=bar)
    bar.newline()
    if not dist_utils.is_main_process():
        return 0
    blocks = {b.name: b for b in find_blocks(model)}
    ranking = scores.ranking()
    from .latency import measure_block_costs

    costs = measure_block_costs(model, batch_size=1, device=dev, progress=bar)  # cached after the first run
    bar.newline()
    print(f"{args.criterion} scores on {scores.samples} calibration images ({scores.seconds:.1f} s); "
          "lower = safer to remove")
    print(f"latency: measured per block at batch 1 on {costs.device} ({costs.threads} threads), whole model "
          f"{costs.base_ms:.3f} ms (p10–p90 {costs.base_p10_ms:.3f}–{costs.base_p90_ms:.3f}: a wide range means "
          "other jobs disturbed the timing)" + (" (cached)" if costs.from_cache else ""))
    print(f"{'rank':>4}  {'block':<24}{'score':>12}{'MACs':>12}{'params':>12}{'latency ms':>12}")
    for i, name in enumerate(ranking, 1):
        b = blocks[name]
        print(f"{i:>4}  {name:<24}{scores.scores[name]:>12.6f}{_fmt_int(b.macs):>12}{_fmt_int(b.params):>12}"
              f"{costs.block_ms.get(name, float('nan')):>12.3f}")
    for b in blocks.values():
        if not b.removable:
            print(f"   -  {b.name:<24}not removable: {b.reason}")
    if args.json:
        _write_json(args.json, {"criterion": scores.criterion, "samples": scores.samples,
                                "seconds": scores.seconds, "scores": scores.scores,
                                "options": scores.options, "model": args.model, "seed": args.seed,
                                "latency": costs.to_dict()})
    return 0


def _finetune_config(args: argparse.Namespace, epochs: float, steps: int | None, distill: bool):
    from .training import FinetuneConfig

    return FinetuneConfig(epochs=epochs, steps=steps, lr=args.lr, distill=distill, seed=args.seed,
                          label_smoothing=getattr(args, "label_smoothing", 0.0),
                          schedule=getattr(args, "schedule", "cosine"))


def _world_loaders(args: argparse.Namespace, model, dev, *, train_needed: bool):
    """Training loader sharded across torchrun ranks (global batch = --batch-size) and the test loader."""
    from .distributed import make_loader_for_world

    train = None
    if train_needed:
        train_ds = _dataset(args, model, "train", augment=not getattr(args, "no_augment", False))
        train = make_loader_for_world(train_ds, global_batch_size=args.batch_size, shuffle=True, seed=args.seed,
                                      num_workers=args.num_workers or 0, drop_last=False, device=dev)
    test_ds = _subset(args, _dataset(args, model, "test", whole=args.eval_samples is None), args.eval_samples)
    test = _loader(args, test_ds, batch_size=max(args.batch_size, 256), device=dev)
    return train, test


def _prune_request(args: argparse.Namespace, model, device):
    """The :class:`~cka_analysis.workflow.PruneRequest` of ``cka-prune prune``'s arguments (validated)."""
    from .pruning import Target
    from .recovery import RecoveryConfig
    from .workflow import PruneRequest

    target = None
    if args.remove is not None:
        target = Target("blocks", args.remove)
    elif args.target_macs_reduction is not None:
        target = Target("macs", args.target_macs_reduction)
    elif args.target_params_reduction is not None:
        target = Target("params", args.target_params_reduction)
    elif getattr(args, "target_latency_reduction", None) is not None:
        target = Target("latency", args.target_latency_reduction)
    blocks = tuple(b.strip() for b in args.blocks.split(",") if b.strip()) if args.blocks else None
    return PruneRequest(
        model=model, data=args.data, download=args.download, calibration_samples=args.samples,
        criterion=args.criterion, debiased=args.debiased, capacity_weight=args.capacity_weight, target=target,
        blocks=blocks, iterative=args.iterative,
        recovery=RecoveryConfig.parse(args.recovery, method=args.recovery_method, seed=args.seed),
        eval_samples=args.eval_samples, device=str(device), amp=args.amp,
        batch_size=args.batch_size, seed=args.seed, latency_batch_size=getattr(args, "latency_batch_size", 1),
        num_workers=args.num_workers,
    )


def _announce_recovery(cfg, bar: StderrProgress, estimate) -> None:
    """Say before starting what the recovery will cost here (and what it left on the reference benchmark);
    ``estimate`` is a zero-argument callable, called only when there is a recovery to run."""
    if cfg.images <= 0:
        bar.info("recovery: none (the pruned model is saved as it is after removal)")
        return
    est = estimate()
    drop = est.get("reference_drop_pp")
    bar.info(f"recovery {cfg.describe()}: {cfg.images:,} training images, about {est['seconds']:.0f} s on "
             "this device" + (f" (on {est['reference']}: {drop:.1f} points below the unpruned model)"
                              if drop is not None else ""))


def cmd_prune(args: argparse.Namespace, bar: StderrProgress) -> int:
    from . import distributed as dist_utils
    from .errors import ConfigError
    from .export import save_pruned
    from .metrics import format_duration
    from .native import NATIVE_DIRS
    from .workflow import PruneData, check_feasible, estimate_run, run_prune

    dev = dist_utils.init_from_env(args.device)
    out = Path(args.out)
    if (out / "manifest.json").exists() and not args.resume:
        raise ConfigError(f"--out {out} already holds a saved model; choose another --out or pass --resume")
    model = _open_args(args)
    request = _prune_request(args, model, dev)
    check_feasible(request, model)  # bad blocks or an unreachable target: refused before the estimate's probe
    data = PruneData().filled(request, model.cka_preset, recovery=request.recovery.images > 0, progress=bar)
    estimated = None
    if dist_utils.is_main_process():
        advice = plan_advice(request.criterion, request.macs_target) if request.target is not None else None
        if advice:
            bar.info("plan: " + advice)
        est = estimate_run(request, model, data, resume_dir=out / ".resume" if args.resume else None)
        estimated = est.seconds
        _announce_recovery(est.request.recovery, bar, lambda: est.recovery)
        if est.resumed is None:
            bar.info(f"the whole run: about {format_duration(est.seconds)} on this device")
        else:
            r = est.resumed
            done = ["the saved scores reused"] if r["scores"] else []
            if r["removals_done"]:
                done.append(f"{r['removals_done']} iterative step{'s' if r['removals_done'] > 1 else ''} saved")
            if r["step"] is not None:
                done.append(f"recovery going on from step {r['step']:,}/{r['total']:,}")
            bar.info(f"the rest of the run: about {format_duration(est.seconds)} on this device "
                     f"({', '.join(done)})")
    outcome = run_prune(request, data=data, progress=bar, checkpoint_dir=out / ".resume", resume=args.resume,
                        estimated_seconds=estimated)
    bar.newline()
    if dist_utils.is_main_process():
        report = outcome.record.to_dict()
        save_pruned(outcome.model, out, report=report)
        _write_json(str(out / "report.json"), report)
        print(outcome.record.summary())
        native = [d for d in NATIVE_DIRS if (out / d).is_dir()]
        print(f"wrote {out}/ (model.safetensors, manifest.json, report.json"
              + "".join(f", {d}/: the native format" for d in native) + ")")
        if not outcome.record.cancelled:
            _clear_resume(out / ".resume")
    dist_utils.barrier()
    return 0


def cmd_recover(args: argparse.Namespace, bar: StderrProgress) -> int:
    from .errors import CheckpointError, ConfigError
    from .export import load_pruned, open_model, save_pruned
    from .workflow import (
        PruneData,
        PruneRecord,
        PruneRequest,
        estimate_further,
        further_recovery,
        recover_further,
    )

    out = Path(args.out)
    if (out / "manifest.json").exists():
        raise ConfigError(f"--out {out} already holds a saved model; choose another --out")
    model = load_pruned(args.model)
    report = model.cka_manifest.get("report") or {}
    if report.get("format") is None:
        raise ConfigError(f"{args.model} has no pruning record (report.json of cka-prune prune): recover needs "
                          "it to know the original model and data; use cka-prune finetune instead")
    record = PruneRecord.from_dict(report)
    req = record.request
    origin = req.get("origin") or {"model": req["model"], "weights": req.get("weights"),
                                   "num_classes": req.get("num_classes")}
    if args.original:
        origin = {"model": args.original, "weights": args.original_weights, "num_classes": origin["num_classes"]}
    try:
        base = open_model(origin["model"], weights=origin["weights"], num_classes=origin["num_classes"],
                          block_patterns=origin.get("block_patterns"))
    except (ConfigError, CheckpointError) as exc:
        raise ConfigError(f"cannot reopen the original model of {args.model} ({exc}); name it with --original "
                          "(and --original-weights)") from exc
    config = further_recovery(record, args.recovery)  # the run's own recipe and seed, with this budget
    if args.recovery_method is not None:
        config = replace(config, method=args.recovery_method)
    estimated = None
    data = None
    if config.images > 0:
        request = PruneRequest.from_dict(req, model=base)
        data = PruneData().filled(request, base.cka_preset, recovery=True, progress=bar)
        est = estimate_further(record, model, base, config, data)
        estimated = est.seconds
        config = est.request.recovery
        _announce_recovery(config, bar, lambda: est.recovery)
    else:
        _announce_recovery(config, bar, lambda: {})
    outcome = recover_further(model, record, base, config, data=data, progress=bar, estimated_seconds=estimated)
    bar.newline()
    new = outcome.record.to_dict()
    save_pruned(outcome.model, out, report=new)
    _write_json(str(out / "report.json"), new)
    print(outcome.record.summary())
    print(f"wrote {out}/ (model.safetensors, manifest.json, report.json)")
    return 0


def _clear_resume(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def cmd_finetune(args: argparse.Namespace, bar: StderrProgress) -> int:
    from . import distributed as dist_utils
    from .device import describe_devices
    from .export import save_pruned
    from .training import finetune

    dev = dist_utils.init_from_env(args.device)
    model = _open_args(args)
    teacher = _open(args.distill_from, args.distill_weights) if args.distill_from else None
    train, test = _world_loaders(args, model, dev, train_needed=True)
    cfg = _finetune_config(args, args.epochs, args.steps, teacher is not None)
    out = Path(args.out)
    ckpt = out / ".resume" / "finetune.pt"
    result = finetune(model, train, cfg, teacher=teacher, eval_loader=test,
                      device=dev, progress=bar, checkpoint_path=ckpt, resume=args.resume)
    bar.newline()
    if dist_utils.is_main_process():
        previous = getattr(model, "cka_manifest", {}).get("report", {})
        report = {"previous": previous or None, "finetune": {"config": cfg.to_dict(), **result.to_dict()},
                  "command": dict(vars(args)),
                  "world_size": dist_utils.world_size()}
        save_pruned(model, out, report=report)
        _write_json(str(out / "report.json"), report)
        best = "-" if result.best_accuracy is None else f"{result.best_accuracy:.2f} %"
        print(f"fine-tuned {result.steps} steps in {result.seconds:.1f} s on {dist_utils.world_size()} "
              f"process(es), {describe_devices(result.devices)}; best test accuracy {best} (step {result.best_step})"
              + (" — cancelled, best weights kept" if result.cancelled else ""))
        print(f"wrote {out}/ (model.safetensors, manifest.json, report.json)")
        if not result.cancelled:
            _clear_resume(out / ".resume")
    dist_utils.barrier()
    return 0


def cmd_evaluate(args: argparse.Namespace, bar: StderrProgress) -> int:
    from .blocks import removed_blocks
    from .device import describe_device, resolve_device
    from .latency import compare_latency
    from .metrics import count_macs, count_params, evaluate

    dev = resolve_device(args.device)
    model = _open_args(args)
    preset = model.cka_preset
    ds = _subset(args, _dataset(args, model, "test", bar=bar, whole=args.samples is None), args.samples)
    loader = _loader(args, ds, batch_size=max(args.batch_size, 1), device=dev)
    acc = evaluate(model, loader, device=dev, amp=_amp(args), progress=bar)
    bar.newline()
    result: dict[str, Any] = {
        "model": args.model, "arch": preset.arch, "removed": removed_blocks(model), "data": args.data,
        "device": describe_device(dev), "top1": acc.top1, "top5": acc.top5, "loss": acc.loss,
        "samples": acc.samples, "macs": count_macs(model, preset.input_size), "params": count_params(model),
    }
    if not args.no_latency:
        lat = compare_latency({"model": model}, batch_size=1, device=dev)["model"]
        result["latency_ms"] = {"median": lat.median_ms, "p10": lat.p10_ms, "p90": lat.p90_ms, "batch_size": 1}
    print(f"{args.model}: {acc}")
    print(f"MACs {_fmt_int(result['macs'])}, parameters {_fmt_int(result['params'])}"
          + (f", latency {result['latency_ms']['median']:.2f} ms (batch 1, {result['device']})"
             if "latency_ms" in result else ""))
    if args.robustness:
        from .robustness import evaluate_robustness, parse_eps

        kinds = [k.strip() for k in args.robustness.split(",") if k.strip()]
        eps = parse_eps(args.eps)
        rob = evaluate_robustness(model, loader, mean=preset.mean, std=preset.std, kinds=kinds, eps=eps,
                                  device=dev, pgd_steps=args.pgd_steps,
                                  seed=args.seed, progress=bar)
        bar.newline()
        result["robustness"] = rob.to_dict()
        for curve in (rob.fgsm, rob.pgd):
            if curve is not None:
                vals = ", ".join(f"ε={e * 255:g}/255: {a:.2f} %" for e, a in curve.points())
                print(f"{curve.attack.upper()}: {vals}")
        if rob.corruptions is not None:
            corr = rob.corruptions
            vals = ", ".join(f"s{s}: {a:.2f} %" for s, a in zip(corr.severities, corr.mean_per_severity(), strict=True))
            print(f"corruptions (mean over {len(corr.corruptions)}): {vals}")
    if args.json:
        _write_json(args.json, result)
    return 0


def cmd_export(args: argparse.Namespace, bar: StderrProgress) -> int:
    import shutil

    from .errors import ConfigError
    from .export import export_onnx, export_pt2, load_pruned, read_manifest

    src = Path(args.model)
    if not src.is_dir():
        raise ConfigError(f"{src} is not a directory written by `cka-prune prune` or `finetune`")
    read_manifest(src)
    model = load_pruned(src)
    if args.format == "safetensors":
        dest = Path(args.out) if args.out else src
        if dest.resolve() != src.resolve():
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("model.safetensors", "manifest.json", "report.json"):
                if (src / name).exists():
                    shutil.copy2(src / name, dest / name)
        print(f"safetensors weights and manifest in {dest}/ (load with cka_analysis.export.load_pruned)")
    elif args.format == "pt2":
        path = export_pt2(model, Path(args.out) if args.out else src / "model.pt2")
        print(f"wrote {path} (load with torch.export.load)")
    else:
        info = export_onnx(model, Path(args.out) if args.out else src / "model.onnx")
        check = (f"checked with onnxruntime, max |Δ| {info['max_abs_diff']:.2e}" if info.get("checked")
                 else "not checked (onnxruntime not installed)")
        print(f"wrote {info['path']} ({check})")
    return 0


COMMANDS = {
    "models": cmd_models,
    "heatmap": cmd_heatmap,
    "score": cmd_score,
    "prune": cmd_prune,
    "recover": cmd_recover,
    "finetune": cmd_finetune,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 1 internal error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from . import distributed as dist_utils
    from .errors import CKAPruneError

    main_rank = int(os.environ.get("RANK", "0")) == 0
    bar = StderrProgress(enabled=not args.quiet and main_rank)
    finished = False
    try:
        status = COMMANDS[args.command](args, bar)
        finished = True
        return status
    except CKAPruneError as exc:
        bar.newline()
        if args.debug:
            raise
        print(f"cka-prune {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # stdout was closed early (e.g. piped into `head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        bar.newline()
        hint = " (rerun with --resume to go on)" if args.command in ("prune", "finetune") else ""
        print(f"cka-prune {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        bar.newline()
        if args.debug:
            raise
        from .device import is_out_of_memory

        if is_out_of_memory(exc):
            print(f"cka-prune {args.command}: error: out of memory — use a smaller --batch-size or "
                  "--device cpu", file=sys.stderr)
            return EXIT_USAGE
        print(f"cka-prune {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        dist_utils.shutdown(synchronise=finished)
