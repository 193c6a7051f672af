"""Typed records at the seams between the library, its front ends and ``report.json``.

One result type per layer:

* :class:`~cka_analysis.recovery.RecoveryResult` — what :func:`~cka_analysis.recovery.recover` returns: the
  recovered model and what it did. Its JSON-ready part is a :class:`RecoveryRecord`; the fields both hold are
  one class, :class:`~cka_analysis.recovery.RecoveryFacts`.
* :class:`~cka_analysis.pruning.PruneResult` — what :func:`~cka_analysis.pruning.prune` returns: the pruned model
  and its :class:`~cka_analysis.pruning.PruneStep` trajectory (each step's recovery a :class:`RecoveryRecord`).
* :class:`~cka_analysis.workflow.PruneOutcome` — what :func:`~cka_analysis.workflow.run_prune` returns: the model
  and its :class:`~cka_analysis.workflow.PruneRecord` (the model-free record a front end keeps and
  ``report.json`` holds), whose ``recovery`` is a :class:`RecoveryRecord` and ``latency_ms`` a
  :class:`LatencyRecord`.

Every record has ``to_dict``/``from_dict``; the JSON they write is the format ``report.json`` always had, so older
reports load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .recovery import RecoveryConfig, RecoveryFacts, RecoveryResult

__all__ = ["LatencyRecord", "RecoveryRecord"]


@dataclass
class RecoveryRecord(RecoveryFacts):
    """What one recovery did, without the model (:class:`~cka_analysis.recovery.RecoveryFacts`, its seed
    resolved in ``config``), plus — for a run recovered further afterwards (the dashboard's Compare page) — those
    extra recoveries."""

    further: list[RecoveryRecord] = field(default_factory=list)
    #: for a further recovery: the time estimated before it started and the whole call's wall time (recovery,
    #: data and evaluation), so that estimates can be checked against what they announced
    estimated_seconds: float | None = None
    total_seconds: float | None = None
    #: the recipe as an older report.json wrote it (fields added to RecoveryConfig since are not in it): written
    #: back unchanged, so that a default that did not exist then is not put into the record
    config_as_read: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def images_with_further(self) -> int:
        """Images drawn by this recovery and every further one."""
        return self.images_seen + sum(f.images_seen for f in self.further)

    @classmethod
    def from_result(cls, result: RecoveryResult) -> RecoveryRecord:
        return cls(**result.facts())

    def to_dict(self) -> dict[str, Any]:
        out = {"config": dict(self.config_as_read or self.config.to_dict()), "method": self.method, "images_seen": self.images_seen,
               "bn_images": self.bn_images, "adaptor_images": self.adaptor_images, "steps": self.steps,
               "seconds": self.seconds, "accuracy": self.accuracy, "history": self.history,
               "adaptors": self.adaptors, "cancelled": self.cancelled, "amp": self.amp}
        if self.resumed_step is not None:
            out.update(resumed_step=self.resumed_step, resumed_seconds=self.resumed_seconds)
        if self.devices:  # absent from reports written before it was recorded
            out["devices"] = [dict(d) for d in self.devices]
        if self.further:
            out["further"] = [f.to_dict() for f in self.further]
        for k in ("estimated_seconds", "total_seconds"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecoveryRecord:
        config = RecoveryConfig.from_dict(d.get("config") or {})
        as_read = dict(d.get("config") or {})
        return cls(config=config, config_as_read=None if as_read == config.to_dict() else as_read, images_seen=int(d.get("images_seen", 0)),
                   bn_images=int(d.get("bn_images", 0)), adaptor_images=int(d.get("adaptor_images", 0)),
                   steps=int(d.get("steps", 0)), seconds=float(d.get("seconds", 0.0)), accuracy=d.get("accuracy"),
                   history=list(d.get("history") or []), adaptors=list(d.get("adaptors") or []),
                   cancelled=bool(d.get("cancelled", False)), amp=d.get("amp"),
                   resumed_step=d.get("resumed_step"), resumed_seconds=float(d.get("resumed_seconds", 0.0)),
                   devices=[dict(x) for x in d.get("devices") or []],
                   further=[cls.from_dict(f) for f in d.get("further") or []],
                   estimated_seconds=d.get("estimated_seconds"), total_seconds=d.get("total_seconds"))


#: The fields a latency record has only for a latency target (predicted from per-block costs, then measured).
_PREDICTION = ("predicted", "predicted_reduction", "measured_reduction", "error", "relative_error", "quantile",
               "repeats")
#: The paired speed-up of the pruned model over the base (median and 10th–90th percentile of pruned / base time
#: within a timing round, :func:`cka_analysis.latency.compare_latency` with ``reference=``), when measured.
_RATIO = ("ratio", "ratio_p10", "ratio_p90")


@dataclass
class LatencyRecord:
    """The unpruned and pruned model's median latency (ms) at ``batch_size`` on ``device``, timed interleaved; for
    a latency target also the prediction and how it fared (``error`` = measured − predicted reduction, see
    :func:`cka_analysis.latency.check_prediction`)."""

    base: float
    pruned: float
    batch_size: int
    device: str
    predicted: float | None = None
    predicted_reduction: float | None = None
    measured_reduction: float | None = None
    error: float | None = None
    relative_error: float | None = None
    quantile: float | None = None
    repeats: int | None = None
    ratio: float | None = None
    ratio_p10: float | None = None
    ratio_p90: float | None = None

    @property
    def reduction(self) -> float:
        """1 − pruned / base, from the medians."""
        return 1 - self.pruned / self.base if self.base else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base": self.base, "pruned": self.pruned, "batch_size": self.batch_size,
                               "device": self.device}
        if self.predicted is not None:
            out.update({k: getattr(self, k) for k in _PREDICTION})
        if self.ratio is not None:
            out.update({k: getattr(self, k) for k in _RATIO})
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyRecord:
        return cls(base=float(d["base"]), pruned=float(d["pruned"]), batch_size=int(d["batch_size"]),
                   device=str(d["device"]), **{k: d.get(k) for k in (*_PREDICTION, *_RATIO)})
