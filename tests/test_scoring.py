"""Tests for cka_analysis.scoring on the offline digits demo: every criterion gives one finite score per removable
block, and each data-driven criterion matches a direct computation written here from its definition (the paper's
CKA criterion through ``remove_blocks``); the prefix strategy equals the full one; progress, cancellation,
candidate restriction and custom models with declared blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cka_analysis.blocks import declare_blocks, find_blocks, remove_blocks
from cka_analysis.choices import CRITERION_INFO, DATA_FREE_CRITERIA
from cka_analysis.cka import linear_cka
from cka_analysis.data import calibration_subset, load_dataset, make_loader
from cka_analysis.errors import Cancelled, ConfigError
from cka_analysis.models import attach_preset, get_preset
from cka_analysis.models.preset import Preset
from cka_analysis.progress import CancelToken
from cka_analysis.scoring import (
    CRITERIA,
    REGISTRY,
    Scores,
    ScoringOptions,
    capacity_adjusted,
    get_criterion,
    score_blocks,
)

CALIBRATION = 128
BATCH = 64
ON_CPU = ScoringOptions(device="cpu")




@pytest.fixture(scope="module")
def calib(demo: nn.Module) -> DataLoader:
    train = load_dataset("digits", "train", get_preset(demo))
    return make_loader(calibration_subset(train, CALIBRATION, seed=0), batch_size=BATCH, num_workers=0)


@pytest.fixture(scope="module")
def xy(calib: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x, y) for x, y in calib], strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def removable(demo: nn.Module) -> list[str]:
    return [b.name for b in find_blocks(demo) if b.removable]


@pytest.fixture(scope="module")
def scores(demo: nn.Module, calib: DataLoader) -> dict[str, Scores]:
    """Every criterion once, with the default options (the other tests compare against these)."""
    return {c: score_blocks(demo, calib, c, options=ON_CPU) for c in CRITERIA}


def penultimate(model: nn.Module, x: torch.Tensor, classifier: str = "linear") -> torch.Tensor:
    """The input of the classifier, i.e. the pooled penultimate features, of a full forward pass."""
    out: list[torch.Tensor] = []
    handle = model.get_submodule(classifier).register_forward_pre_hook(lambda m, a: out.append(a[0]))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return out[0]


# ------------------------------------------------------------------------------------------ every criterion
def test_criteria_list() -> None:
    assert CRITERIA == ("cka", "random", "weight_norm", "block_influence", "angular", "taylor", "loss",
                        "cka_capacity")
    assert DATA_FREE_CRITERIA == ("random", "weight_norm")


def test_registry_implements_exactly_the_declared_criteria() -> None:
    assert tuple(REGISTRY) == CRITERIA == tuple(CRITERION_INFO)
    for name, crit in REGISTRY.items():
        assert crit.name == name and crit.info is CRITERION_INFO[name]
        assert get_criterion(name) is crit
        assert crit.info.description and "\n" not in crit.info.description
    with pytest.raises(ConfigError, match="criterion='fisher' is not known; choose one of cka, random"):
        get_criterion("fisher")
    with pytest.raises(ConfigError, match="not a Scores record"):
        Scores.from_dict({"criterion": "cka", "scores": {"a": "high"}, "seconds": 1, "samples": 2})


def test_criterion_metadata_is_importable_without_torch() -> None:
    # cka-prune --help imports choices.py; torch must stay out of it
    import subprocess
    import sys

    code = ("import sys, cka_analysis.choices as c; assert c.CRITERION_INFO['loss'].needs_labels; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if CRITERION_INFO[c].needs_data])
def test_needs_labels_says_whether_the_labels_matter(criterion: str, demo, xy) -> None:
    x, y = xy
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert not torch.equal(shuffled, y)
    a = score_blocks(demo, (x, y), criterion).scores
    b = score_blocks(demo, (x, shuffled), criterion).scores
    if CRITERION_INFO[criterion].needs_labels:
        assert a != b
    else:
        assert a == b


@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_finite_score_per_removable_block(criterion: str, scores, removable) -> None:
    s = scores[criterion]
    assert s.criterion == criterion
    assert list(s.scores) == removable  # forward order, non-removable blocks left out
    assert len(removable) == 7
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.scores.values())
    assert s.seconds > 0
    assert s.samples == (CALIBRATION if CRITERION_INFO[criterion].needs_data else 0)
    assert len(set(s.scores.values())) > 1  # the criterion tells blocks apart
    assert sorted(s.ranking(), key=s.scores.__getitem__) == s.ranking()
    d = s.to_dict()
    assert d["criterion"] == criterion and d["scores"] == s.scores
    assert Scores.from_dict(json.loads(json.dumps(d))) == s


def test_cka_is_one_minus_cka_of_penultimate_features(demo, xy, scores, removable) -> None:
    x, _ = xy
    full = penultimate(demo, x)
    for b in removable:
        minus = penultimate(remove_blocks(demo, [b]), x)
        expected = 1.0 - linear_cka(full, minus)
        assert scores["cka"].scores[b] == pytest.approx(expected, abs=1e-5), b
    assert scores["cka"].options["strategy"] == "prefix"
    assert scores["cka"].options["debiased"] is False
    # on the trained demo the first block matters most and the deep blocks least
    assert scores["cka"].ranking()[-1] == "layer1.0"


def test_cka_capacity_is_cka_times_the_parameter_ratio(demo, scores, removable) -> None:
    params = {b.name: b.params for b in find_blocks(demo) if b.removable}
    mean = sum(params.values()) / len(params)
    cap = scores["cka_capacity"]
    for b in removable:
        assert cap.scores[b] == pytest.approx(max(scores["cka"].scores[b], 1e-6) * params[b] / mean, rel=1e-9), b
    assert cap.options["capacity_weight"] == 1.0
    # the constructed case on the demo: plain cka removes the last (parameter-heavy) block first, the capacity-
    # aware order a first-stage block of the same MACs
    assert scores["cka"].ranking()[0] == "layer3.2"
    assert cap.ranking()[0] == "layer1.2"


def test_capacity_knob() -> None:
    s = {"small": 0.10, "big": 0.08, "mid": 0.0}
    p = {"small": 1_000, "big": 16_000, "mid": 4_000}
    # equal MACs: the small block with a slightly higher score goes before the big one
    one = capacity_adjusted(s, p, 1.0)
    assert sorted(one, key=one.__getitem__) == ["mid", "small", "big"]
    zero = capacity_adjusted(s, p, 0.0)  # weight 0 is plain cka order (scores floored at 1e-6)
    assert zero == {"small": 0.10, "big": 0.08, "mid": 1e-6}
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ConfigError, match="capacity_weight"):
            capacity_adjusted(s, p, bad)


def test_plan_advice_names_the_reason_and_the_deep_recommendation() -> None:
    from cka_analysis.choices import DEEP_CRITERION, DEEP_TARGET, plan_advice

    assert DEEP_CRITERION == "cka_capacity"  # it won on the validation split at −75 % (benchmarks/deep.py)
    assert plan_advice("cka", 0.3) is None  # nothing to say about a shallow cut with the paper's criterion
    assert "parameters" in plan_advice("cka_capacity", 0.3) and "recommended" not in plan_advice("cka_capacity", 0.3)
    deep = plan_advice("cka", DEEP_TARGET)
    assert deep is not None and f"recommended for ≥ {100 * DEEP_TARGET:.0f} % fewer MACs: cka_capacity" in deep
    assert "91.22" in deep  # the measured reason
    assert "recommended" in plan_advice("cka_capacity", 0.75)
    assert plan_advice("cka", None) is None  # no MACs target: no deep-cut advice
    assert DEEP_TARGET == 0.5 and plan_advice("cka", 0.526) is not None  # `macs:50%` on ResNet-56 is deep


def test_debiased_cka(demo, calib, xy, removable) -> None:
    x, _ = xy
    debiased = ScoringOptions(debiased=True, device="cpu")
    s = score_blocks(demo, calib, "cka", candidates=removable[:3], options=debiased)
    full = penultimate(demo, x)
    for b in removable[:3]:
        expected = 1.0 - linear_cka(full, penultimate(remove_blocks(demo, [b]), x), debiased=True)
        assert s.scores[b] == pytest.approx(expected, abs=1e-5)
    assert s.options["debiased"] is True


def test_loss_is_the_increase_of_cross_entropy(demo, xy, scores, removable) -> None:
    x, y = xy
    with torch.no_grad():
        base = F.cross_entropy(demo(x), y).item()
        for b in removable:
            pruned = remove_blocks(demo, [b]).eval()
            expected = F.cross_entropy(pruned(x), y).item() - base
            assert scores["loss"].scores[b] == pytest.approx(expected, abs=1e-4), b


def _block_io(model: nn.Module, names: list[str], x: torch.Tensor, grad: bool = False):
    """(input, output) of each named block in one forward pass (outputs keep their gradient when ``grad``)."""
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for n in names:
        def hook(m, args, out, n=n):
            if grad:
                out.retain_grad()
            io[n] = (args[0], out)
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        with torch.set_grad_enabled(grad):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return io, logits


def test_block_influence_and_angular_follow_their_definitions(demo, xy, scores, removable) -> None:
    x, _ = xy
    io, _ = _block_io(demo.eval(), removable, x)
    for b in removable:
        inp, out = io[b]
        cos = F.cosine_similarity(inp.mean(dim=(2, 3)), out.mean(dim=(2, 3)), dim=1).double()
        assert scores["block_influence"].scores[b] == pytest.approx(1 - cos.mean().item(), abs=1e-5), b
        angle = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
        assert scores["angular"].scores[b] == pytest.approx(angle, abs=1e-5), b


def test_taylor_is_the_gate_gradient(demo, xy, scores, removable) -> None:
    # y = x + g·(block(x) − x) at g = 1: ∂L/∂g = Σ ∂L/∂y ⊙ (block(x) − x), L the summed cross-entropy
    x, y = xy
    io, logits = _block_io(demo.eval(), removable, x, grad=True)
    F.cross_entropy(logits, y, reduction="sum").backward()
    for b in removable:
        inp, out = io[b]
        expected = abs(float((out.grad * (out - inp)).sum().detach())) / len(x)
        assert scores["taylor"].scores[b] == pytest.approx(expected, rel=1e-4, abs=1e-7), b
    demo.zero_grad(set_to_none=True)


def test_weight_norm_is_the_mean_absolute_weight(demo, scores, removable) -> None:
    for b in removable:
        block = demo.get_submodule(b)
        ws = [block.conv1.weight, block.conv2.weight]
        expected = sum(w.abs().sum().item() for w in ws) / sum(w.numel() for w in ws)
        assert scores["weight_norm"].scores[b] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("criterion", ["cka", "loss"])
def test_prefix_strategy_equals_full_strategy(demo, calib, scores, criterion: str) -> None:
    full = score_blocks(demo, calib, criterion, options=ScoringOptions(strategy="full", device="cpu"))
    assert full.options["strategy"] == "full"
    assert list(full.scores) == list(scores[criterion].scores)
    for b, v in full.scores.items():
        assert scores[criterion].scores[b] == pytest.approx(v, abs=1e-5), b


def test_calibration_formats_agree(demo, calib, xy, scores) -> None:
    x, y = xy
    batched = ScoringOptions(batch_size=BATCH, device="cpu")
    as_pair = score_blocks(demo, (x, y), "cka", options=batched)
    as_dataset = score_blocks(demo, calib.dataset, "cka", options=batched)
    as_images = score_blocks(demo, x, "block_influence", options=batched)  # no labels needed
    for b, v in scores["cka"].scores.items():
        assert as_pair.scores[b] == pytest.approx(v, abs=1e-6)
        assert as_dataset.scores[b] == pytest.approx(v, abs=1e-6)
        assert as_images.scores[b] == pytest.approx(scores["block_influence"].scores[b], abs=1e-6)
    with pytest.raises(ConfigError, match="differ in length"):
        score_blocks(demo, (x, y[:-1]), "cka")
    with pytest.raises(ConfigError, match="calibration must be"):
        score_blocks(demo, [1, 2, 3], "cka")


def test_scoring_leaves_the_model_alone(demo, calib) -> None:
    before = {k: v.clone() for k, v in demo.state_dict().items()}
    demo.train()
    try:
        score_blocks(demo, calib, "taylor", options=ON_CPU)
        assert demo.training and all(m.training for m in demo.modules())  # mode restored
        assert all(p.grad is None for p in demo.parameters())
    finally:
        demo.eval()
    for k, v in demo.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------------------- seeds, data-free
def test_random_is_seeded(demo, scores) -> None:
    again = score_blocks(demo, None, "random", options=ScoringOptions(seed=0))
    assert again.scores == scores["random"].scores
    other = score_blocks(demo, None, "random", options=ScoringOptions(seed=1))
    assert other.scores != again.scores
    assert other.options["seed"] == 1
    assert all(0 <= v < 1 for v in other.scores.values())


def test_data_free_criteria_need_no_calibration(demo) -> None:
    for c in DATA_FREE_CRITERIA:
        s = score_blocks(demo, None, c)
        assert s.samples == 0 and len(s.scores) == 7
    for c in ("cka", "block_influence", "angular", "taylor", "loss"):
        with pytest.raises(ConfigError, match=f"criterion '{c}' needs calibration images"):
            score_blocks(demo, None, c)


def test_bad_arguments(demo, calib) -> None:
    with pytest.raises(ConfigError, match="criterion='fisher' is not known"):
        score_blocks(demo, calib, "fisher")
    with pytest.raises(ConfigError, match="strategy='fast'"):
        score_blocks(demo, calib, "cka", options=ScoringOptions(strategy="fast"))


# ---------------------------------------------------------------------------------------------- candidates
def test_candidates_restrict_the_scored_blocks(demo, calib, scores) -> None:
    chosen = ["layer3.2", "layer1.1", "layer3.2"]
    s = score_blocks(demo, calib, "cka", options=ON_CPU, candidates=chosen)
    assert list(s.scores) == ["layer3.2", "layer1.1"]
    for b, v in s.scores.items():
        assert v == pytest.approx(scores["cka"].scores[b], abs=1e-6)
    with pytest.raises(ConfigError, match=r"\['layer2\.0'\] are not removable"):
        score_blocks(demo, calib, "cka", candidates=["layer2.0"])
    with pytest.raises(ConfigError, match=r"\['layer9\.9'\] are not removable"):
        score_blocks(demo, None, "random", candidates=["layer9.9"])


def test_scoring_a_pruned_model_skips_removed_blocks(demo, calib) -> None:
    pruned = remove_blocks(demo, ["layer2.1", "layer3.1"])
    s = score_blocks(pruned, calib, "cka", options=ON_CPU)
    assert list(s.scores) == ["layer1.0", "layer1.1", "layer1.2", "layer2.2", "layer3.2"]
    full = score_blocks(pruned, calib, "cka", options=ScoringOptions(strategy="full", device="cpu"))
    for b, v in full.scores.items():
        assert s.scores[b] == pytest.approx(v, abs=1e-5)


# ------------------------------------------------------------------------------------ progress and cancel
def test_progress_is_reported_per_batch(demo, calib) -> None:
    calls: list[tuple[int, int | None, str]] = []
    score_blocks(demo, calib, "angular", options=ON_CPU, progress=lambda d, t, m: calls.append((d, t, m)))
    assert [(d, t) for d, t, _ in calls] == [(1, 2), (2, 2)]
    assert all("angular" in m for _, _, m in calls)


def test_cancel_raises_cancelled(demo, calib) -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled, match="scoring was cancelled"):
        score_blocks(demo, calib, "cka", options=ON_CPU, cancel=token)
    # cancelled from the progress callback after the first batch: the second batch never runs
    token = CancelToken()
    seen: list[int] = []

    def progress(done: int, total: int | None, message: str) -> None:
        seen.append(done)
        token.cancel()

    demo.train()
    try:
        with pytest.raises(Cancelled):
            score_blocks(demo, calib, "loss", options=ON_CPU, progress=progress, cancel=token)
        assert demo.training  # the mode is restored on the way out
    finally:
        demo.eval()
    assert seen == [1]


# ------------------------------------------------------------------------------------------- custom models
class ConvResidual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class CustomNet(nn.Module):
    """A model the library does not know: residual conv blocks in a ModuleList, pooled, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stages = nn.ModuleList([ConvResidual(8), ConvResidual(8), nn.Conv2d(8, 12, 1), ConvResidual(12)])
        self.classifier = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for m in self.stages:
            h = m(h)
        return self.classifier(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def custom() -> nn.Module:
    torch.manual_seed(0)
    model = CustomNet().eval()
    return attach_preset(model, Preset("custom", (1, 8, 8), (0.3,), (0.4,), 10))


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criteria_on_a_custom_model_with_declared_blocks(custom, xy, criterion: str) -> None:
    x, y = xy
    s = score_blocks(custom, (x, y), criterion, blocks="stages.*",
                     options=ScoringOptions(batch_size=BATCH, device="cpu"))
    assert list(s.scores) == ["stages.0", "stages.1", "stages.3"]  # stages.2 changes the width
    assert all(math.isfinite(v) for v in s.scores.values())
    if criterion in ("cka", "loss"):
        assert s.options["strategy"] == "full"
    if criterion == "cka":
        full = penultimate(custom, x, "classifier")
        for b, v in s.scores.items():
            minus = penultimate(remove_blocks(custom, [b], blocks="stages.*"), x, "classifier")
            assert v == pytest.approx(1.0 - linear_cka(full, minus), abs=1e-5), b


def test_custom_model_declared_once_and_prefix_refused(custom, xy) -> None:
    x, y = xy
    declared = declare_blocks(remove_blocks(custom, [], blocks="stages.*"), ["stages.0", "stages.1", "stages.3"])
    a = score_blocks(declared, (x, y), "cka", options=ON_CPU)
    b = score_blocks(custom, (x, y), "cka", options=ON_CPU, blocks=["stages.0", "stages.1", "stages.3"])
    assert a.scores == pytest.approx(b.scores, abs=1e-9)
    with pytest.raises(ConfigError, match="cannot be run in pieces"):
        score_blocks(declared, (x, y), "cka", options=ScoringOptions(strategy="prefix", device="cpu"))
