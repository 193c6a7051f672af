"""Typed robustness results: what :func:`~cka_analysis.robustness.evaluate_robustness` returns.

Every accuracy in these records is a top-1 accuracy in **percent** (0–100), as everywhere else in the project's
reports. ε is in pixel units of [0, 1] (8/255 = eight grey levels). Budgets and severities are kept as ordered
sequences next to their accuracies, never as dict keys, so a record survives a JSON round trip unchanged and is
looked up with :meth:`AttackCurve.accuracy_at` / :meth:`CorruptionResult.accuracy_at` (a float ε matches within a
tolerance) instead of by a float key.

``to_dict()`` gives the JSON form (``cka-prune evaluate --json``, the dashboard's report, the benchmarks) and
``from_dict()`` reads it back; ``from_dict`` also reads the dict layout written before these records existed
(``{"fgsm": {ε: acc}, "corruptions": {name: {severity: acc}}, "corruption_mean_per_severity": ...}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["EPS_TOLERANCE", "AttackCurve", "CorruptionResult", "RobustnessResult", "as_results"]

#: ε values closer than this (in pixel units) are the same budget: 2/255 computed twice, or read back from JSON.
EPS_TOLERANCE = 1e-9


def _percent(value: Any, name: str) -> float:
    """A finite accuracy in [0, 100] (percent), or ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite accuracy in percent")
    if not 0.0 <= value <= 100.0:
        raise ConfigError(f"{name}={value!r} must be a percentage in [0, 100] (fractions are multiplied by 100)")
    return float(value)


def _eps_label(eps: float) -> str:
    return f"{eps * 255:g}/255"


@dataclass(frozen=True)
class AttackCurve:
    """Top-1 accuracy (%) under one L∞ attack at each budget: ``eps[i]`` ↦ ``accuracy[i]``.

    ``eps`` are in pixel units of [0, 1], ascending as measured; ε = 0 is the clean accuracy exactly.
    """

    attack: str
    eps: tuple[float, ...]
    accuracy: tuple[float, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.attack, str) or not self.attack:
            raise ConfigError(f"attack={self.attack!r} must name the attack, e.g. 'fgsm'")
        eps = tuple(float(e) for e in self.eps)
        acc = tuple(_percent(a, f"{self.attack} accuracy") for a in self.accuracy)
        if len(eps) != len(acc) or not eps:
            raise ConfigError(f"{self.attack}: {len(eps)} budgets but {len(acc)} accuracies; give one per ε")
        if any(not (math.isfinite(e) and 0.0 <= e <= 1.0) for e in eps):
            raise ConfigError(f"{self.attack}: every ε must lie in [0, 1] (pixel units), got {eps}")
        for i, e in enumerate(eps):
            if any(math.isclose(e, f, rel_tol=0.0, abs_tol=EPS_TOLERANCE) for f in eps[:i]):
                raise ConfigError(f"{self.attack}: ε = {_eps_label(e)} is given twice")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "accuracy", acc)

    def points(self) -> list[tuple[float, float]]:
        """``[(ε, accuracy %), ...]`` in measurement order."""
        return list(zip(self.eps, self.accuracy, strict=True))

    def accuracy_at(self, eps: float) -> float:
        """The accuracy (%) at budget ``eps`` (matched within :data:`EPS_TOLERANCE`, so ``8/255`` finds 8/255).

        ConfigError naming the measured budgets when ``eps`` was not measured.
        """
        for e, a in zip(self.eps, self.accuracy, strict=True):
            if math.isclose(e, float(eps), rel_tol=0.0, abs_tol=EPS_TOLERANCE):
                return a
        measured = ", ".join(_eps_label(e) for e in self.eps)
        raise ConfigError(f"{self.attack} was not measured at ε = {_eps_label(float(eps))}; measured: {measured}")

    def has(self, eps: float) -> bool:
        """Whether budget ``eps`` was measured."""
        return any(math.isclose(e, float(eps), rel_tol=0.0, abs_tol=EPS_TOLERANCE) for e in self.eps)

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "eps": list(self.eps), "accuracy": list(self.accuracy)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], attack: str | None = None) -> AttackCurve:
        """Read :meth:`to_dict`'s form, or the older ``{ε: accuracy}`` mapping (then ``attack`` names it)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"an attack result must be a mapping, got {type(data).__name__}")
        if "eps" in data and "accuracy" in data:
            return cls(str(data.get("attack", attack or "")), tuple(data["eps"]), tuple(data["accuracy"]))
        try:  # legacy: {ε: accuracy} with float or string keys
            pairs = sorted((float(k), v) for k, v in data.items())
        except (TypeError, ValueError):
            raise ConfigError(f"cannot read an attack result from keys {list(data)[:4]}") from None
        return cls(attack or "attack", tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))


@dataclass(frozen=True)
class CorruptionResult:
    """Top-1 accuracy (%) under each common corruption at each severity.

    ``accuracy[name][i]`` is the accuracy under corruption ``name`` at severity ``severities[i]``; ``table`` says
    which parameter table was applied (``"cifar10-c"`` or ``"imagenet-c"``; None when unknown).
    """

    severities: tuple[int, ...]
    accuracy: Mapping[str, tuple[float, ...]]
    table: str | None = None

    def __post_init__(self) -> None:
        sevs = tuple(self.severities)
        if not sevs or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 5 for s in sevs):
            raise ConfigError(f"severities={sevs!r} must be integers from 1 to 5")
        if len(set(sevs)) != len(sevs):
            raise ConfigError(f"severities={sevs!r} repeat a severity")
        if not self.accuracy:
            raise ConfigError("a corruption result needs at least one corruption")
        acc: dict[str, tuple[float, ...]] = {}
        for name, values in self.accuracy.items():
            row = tuple(_percent(v, f"{name} accuracy") for v in values)
            if len(row) != len(sevs):
                raise ConfigError(f"{name}: {len(row)} accuracies for {len(sevs)} severities; give one each")
            acc[str(name)] = row
        object.__setattr__(self, "severities", sevs)
        object.__setattr__(self, "accuracy", acc)

    @property
    def corruptions(self) -> tuple[str, ...]:
        return tuple(self.accuracy)

    def _column(self, severity: int) -> int:
        if severity not in self.severities:
            raise ConfigError(f"severity {severity!r} was not measured; measured: {list(self.severities)}")
        return self.severities.index(severity)

    def accuracy_at(self, name: str, severity: int) -> float:
        """The accuracy (%) under corruption ``name`` at ``severity``."""
        if name not in self.accuracy:
            raise ConfigError(f"corruption {name!r} was not measured; measured: {', '.join(self.accuracy)}")
        return self.accuracy[name][self._column(severity)]

    def mean_per_severity(self) -> tuple[float, ...]:
        """The mean accuracy (%) over the corruptions at each severity, aligned with :attr:`severities`."""
        return tuple(sum(row[j] for row in self.accuracy.values()) / len(self.accuracy)
                     for j in range(len(self.severities)))

    def mean_at(self, severity: int) -> float:
        """The mean accuracy (%) over the corruptions at ``severity``."""
        return self.mean_per_severity()[self._column(severity)]

    def mean(self) -> float:
        """The mean accuracy (%) over every corruption and severity (the mean corruption accuracy)."""
        per = self.mean_per_severity()
        return sum(per) / len(per)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``mean_per_severity`` is derived (written for readers, ignored by :meth:`from_dict`)."""
        return {"table": self.table, "severities": list(self.severities),
                "accuracy": {n: list(v) for n, v in self.accuracy.items()},
                "mean_per_severity": list(self.mean_per_severity())}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorruptionResult:
        """Read :meth:`to_dict`'s form, or the older ``{name: {severity: accuracy}}`` mapping."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a corruption result must be a mapping, got {type(data).__name__}")
        if "severities" in data and "accuracy" in data:
            return cls(tuple(int(s) for s in data["severities"]),
                       {n: tuple(v) for n, v in data["accuracy"].items()}, data.get("table"))
        try:  # legacy: {name: {severity: accuracy}} with int or string keys
            rows = {n: {int(float(k)): v for k, v in per.items()} for n, per in data.items()}
        except (AttributeError, TypeError, ValueError):
            raise ConfigError(f"cannot read a corruption result from keys {list(data)[:4]}") from None
        sevs = tuple(sorted(next(iter(rows.values()), {})))
        try:
            return cls(sevs, {n: tuple(per[s] for s in sevs) for n, per in rows.items()})
        except KeyError as exc:
            raise ConfigError(f"the corruptions were measured at different severities (missing {exc})") from None


@dataclass(frozen=True)
class RobustnessResult:
    """Clean accuracy and the measured robustness of one model on ``samples`` test images (accuracies in %).

    ``fgsm``/``pgd``/``corruptions`` are None when that kind was not requested. ``settings`` records everything
    needed to reproduce the numbers (budgets, PGD steps, seed, normalisation, device, corruption table).
    """

    samples: int
    clean_accuracy: float
    fgsm: AttackCurve | None = None
    pgd: AttackCurve | None = None
    corruptions: CorruptionResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"samples={self.samples!r} must be a positive integer")
        object.__setattr__(self, "clean_accuracy", _percent(self.clean_accuracy, "clean_accuracy"))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The measured kinds, among ``("fgsm", "pgd", "corruptions")``."""
        return tuple(k for k in ("fgsm", "pgd", "corruptions") if getattr(self, k) is not None)

    def attack(self, name: str) -> AttackCurve:
        """The curve of attack ``name`` (``"fgsm"`` or ``"pgd"``); ConfigError when it was not measured."""
        if name not in ("fgsm", "pgd"):
            raise ConfigError(f"attack={name!r} is not one of fgsm, pgd")
        curve = getattr(self, name)
        if curve is None:
            raise ConfigError(f"{name} was not measured; measured: {', '.join(self.kinds) or 'clean accuracy only'}")
        return curve

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples, "clean_accuracy": self.clean_accuracy,
                               "accuracy_units": "percent"}
        for kind in self.kinds:
            out[kind] = getattr(self, kind).to_dict()
        out["settings"] = dict(self.settings)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | RobustnessResult) -> RobustnessResult:
        """Read :meth:`to_dict`'s form (or the older layout, see the module docstring); a record passes through."""
        if isinstance(data, RobustnessResult):
            return data
        if not isinstance(data, Mapping) or "clean_accuracy" not in data or "samples" not in data:
            raise ConfigError("a robustness result must be a mapping with 'samples' and 'clean_accuracy'")
        return cls(
            samples=int(data["samples"]),
            clean_accuracy=data["clean_accuracy"],
            fgsm=AttackCurve.from_dict(data["fgsm"], "fgsm") if data.get("fgsm") else None,
            pgd=AttackCurve.from_dict(data["pgd"], "pgd") if data.get("pgd") else None,
            corruptions=CorruptionResult.from_dict(data["corruptions"]) if data.get("corruptions") else None,
            settings=dict(data.get("settings") or {}),
        )


def as_results(results: Mapping[str, Any], name: str = "results") -> dict[str, RobustnessResult]:
    """``{label: RobustnessResult}`` from records or their dicts (what the figures and the dashboard take)."""
    if not isinstance(results, Mapping):
        raise ConfigError(f"{name} must map a model label to its robustness result, got {type(results).__name__}")
    return {str(k): RobustnessResult.from_dict(v) for k, v in results.items()}
