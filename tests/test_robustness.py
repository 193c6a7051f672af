"""Tests for cka_analysis.robustness: adversarial accuracy (captum FGSM/PGD) and tensor common corruptions.

The model is the project's bundled digits demo (``open_model("digits_resnet", weights="demo")``, a 9-block
CIFAR-style ResNet trained on scikit-learn's 8×8 digits, ≈ 99 % test accuracy): real weights and real data,
offline, so the attack and corruption curves are measured on a model that actually classifies. Attacks run on
at most a few hundred 8×8 images with few PGD steps, so the file stays well under a minute on two CPU cores.
"""

from __future__ import annotations

import colorsys
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cka_analysis.data import dataset_targets, load_dataset
from cka_analysis.errors import Cancelled, ConfigError, DataError
from cka_analysis.export import open_model
from cka_analysis.models.preset import get_preset
from cka_analysis.progress import CancelToken
from cka_analysis.robustness import (
    CORRUPTION_TABLES,
    CORRUPTIONS,
    DEFAULT_EPS,
    AttackCurve,
    CorruptionResult,
    RobustnessResult,
    RobustnessSpec,
    adversarial_accuracy,
    corrupt,
    corruption_accuracy,
    corruption_table_for,
    disk_kernel,
    evaluate_robustness,
    fgsm_perturb,
    hsv_to_rgb,
    parse_eps,
    pgd_perturb,
    rgb_to_hsv,
)

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")


class Digits:
    """The bundled demo model, the digits test split as [0, 1] pixels and labels, and the preset normalisation."""

    def __init__(self) -> None:
        self.model = open_model("digits_resnet", weights="demo", device="cpu")
        preset = get_preset(self.model)
        self.mean, self.std = tuple(preset.mean), tuple(preset.std)
        dataset = load_dataset("digits", "test", preset)
        normalised = torch.stack([dataset[i][0] for i in range(len(dataset))])
        self.pixels = (normalised * self.std[0] + self.mean[0]).clamp(0.0, 1.0)
        self.labels = torch.tensor(dataset_targets(dataset), dtype=torch.long)
        self.model.eval()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean[0]) / self.std[0]

    def loader(self, n: int | None = None, batch_size: int = 128) -> DataLoader:
        pixels, labels = self.pixels[:n], self.labels[:n]
        return DataLoader(TensorDataset(self.normalise(pixels), labels), batch_size=batch_size, shuffle=False)

    def clean_accuracy(self, n: int | None = None) -> float:
        with torch.no_grad():
            logits = self.model(self.normalise(self.pixels[:n]))
        correct = int((logits.argmax(dim=1) == self.labels[:n]).sum())
        return 100.0 * correct / len(self.labels[:n])


@pytest.fixture(scope="module")
def digits() -> Digits:
    d = Digits()
    assert len(d.labels) >= 300
    assert d.clean_accuracy() > 95.0, "the demo model must actually classify digits"
    return d


def _stats(d: Digits) -> dict:
    return {"mean": d.mean, "std": d.std, "device": "cpu"}


def _smooth_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Natural-ish test images: low-frequency random patterns upsampled, in [0.05, 0.95]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, max(2, size // 8), max(2, size // 8), generator=g)
    smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return 0.05 + 0.9 * smooth


# ---------------------------------------------------------------------------------------------------------------
# parse_eps
# ---------------------------------------------------------------------------------------------------------------


def test_parse_eps_fractions_and_decimals() -> None:
    assert parse_eps("1/255,2/255,0.01") == [1 / 255, 2 / 255, 0.01]
    assert parse_eps(" 8/255 , 0 ,1") == [8 / 255, 0.0, 1.0]
    assert parse_eps("0.5/2") == [0.25]


@pytest.mark.parametrize(
    "text", ["", "  ", "abc", "1/0", "-0.1", "1/-255", "8", "1/255,,2/255", "nan", "inf", "1/x"]
)
def test_parse_eps_rejects_bad_input(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_eps(text)


def test_parse_eps_hints_at_pixel_units() -> None:
    with pytest.raises(ConfigError, match="8/255"):
        parse_eps("8")


# ---------------------------------------------------------------------------------------------------------------
# Adversarial accuracy
# ---------------------------------------------------------------------------------------------------------------


def test_eps_zero_is_exactly_clean_accuracy(digits: Digits) -> None:
    clean = digits.clean_accuracy()
    for attack in ("fgsm", "pgd"):
        result = adversarial_accuracy(
            digits.model, digits.loader(), attack=attack, eps=[0.0], **_stats(digits)
        )
        assert result == AttackCurve(attack, (0.0,), (clean,))
        assert result.accuracy_at(0.0) == clean
    # The attack path itself at ε = 0 (no short cut): the images come back unchanged and classify as before.
    pixels, labels = digits.pixels[:200], digits.labels[:200]
    for adv in (
        fgsm_perturb(digits.model, pixels, labels, 0.0),
        pgd_perturb(digits.model, pixels, labels, 0.0, steps=2),
    ):
        torch.testing.assert_close(adv, pixels, atol=1e-6, rtol=0)
        with torch.no_grad():
            correct = int((digits.model(digits.normalise(adv)).argmax(1) == labels).sum())
        assert 100.0 * correct / len(labels) == digits.clean_accuracy(n=200)


def test_accuracy_does_not_rise_with_eps_and_pgd_is_stronger(digits: Digits) -> None:
    eps = [0.0, 0.05, 0.1, 0.2, 0.3]
    loader = digits.loader(n=160)
    fgsm = adversarial_accuracy(digits.model, loader, attack="fgsm", eps=eps, seed=0, **_stats(digits))
    pgd = adversarial_accuracy(
        digits.model, loader, attack="pgd", eps=eps, pgd_steps=5, seed=0, **_stats(digits)
    )
    assert fgsm.eps == tuple(eps) == pgd.eps
    assert fgsm.accuracy_at(0.0) == pgd.accuracy_at(0.0) == digits.clean_accuracy(n=160)
    for curve in (fgsm, pgd):
        values = list(curve.accuracy)
        assert all(a >= b for a, b in itertools.pairwise(values)), values
        assert values[-1] < values[0] - 50, "a large budget must break the model"
    for e in eps:
        assert pgd.accuracy_at(e) <= fgsm.accuracy_at(e), (e, pgd, fgsm)
    assert pgd.accuracy_at(0.1) < fgsm.accuracy_at(0.1) - 5, "5-step PGD should be clearly stronger than FGSM"


def test_pgd_is_repeatable_under_a_seed_and_draws_nothing_from_the_global_rng(digits: Digits) -> None:
    # a loader with its own generator: iterating it does not draw its base seed from the global RNG either
    dataset = TensorDataset(digits.normalise(digits.pixels[:120]), digits.labels[:120])
    loader = DataLoader(dataset, batch_size=40, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = adversarial_accuracy(
        digits.model, loader, attack="pgd", eps=[0.1, 0.15], pgd_steps=3, seed=3, **_stats(digits)
    )
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(2)  # another global stream: the same numbers, as the start comes from a local generator
    second = adversarial_accuracy(
        digits.model, loader, attack="pgd", eps=[0.1, 0.15], pgd_steps=3, seed=3, **_stats(digits)
    )
    assert first == second
    state = torch.get_rng_state()
    corruption_accuracy(digits.model, loader, corruptions=NOISE, severities=(5,), **_stats(digits))
    evaluate_robustness(
        digits.model, loader, kinds="fgsm,pgd", eps=[0.1], pgd_steps=2, max_samples=40, **_stats(digits)
    )
    assert torch.equal(state, torch.get_rng_state()), "evaluation must not draw from the global RNG"

    pixels, labels = digits.pixels[:64], digits.labels[:64]
    a = pgd_perturb(digits.model, pixels, labels, 0.1, mean=digits.mean, std=digits.std, steps=3, seed=1)
    b = pgd_perturb(digits.model, pixels, labels, 0.1, mean=digits.mean, std=digits.std, steps=3, seed=1)
    c = pgd_perturb(digits.model, pixels, labels, 0.1, mean=digits.mean, std=digits.std, steps=3, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "a different seed must change the random start"
    assert torch.equal(state, torch.get_rng_state())


def test_concurrent_evaluations_neither_disturb_each_other_nor_rewind_the_global_rng(digits: Digits) -> None:
    """Two dashboard sessions evaluate at once while a third thread draws from the global RNG: each evaluation
    gives the numbers it gives alone, and the third thread sees its seeded stream unbroken (no seeding, no
    restore of process-wide state from a worker thread)."""
    import threading

    x, y = digits.normalise(digits.pixels[:80]), digits.labels[:80]
    batches = [(x[i:i + 40], y[i:i + 40]) for i in range(0, 80, 40)]  # a plain list: no DataLoader seed draw

    def pgd() -> object:
        return adversarial_accuracy(digits.model, batches, attack="pgd", eps=[0.1, 0.2], pgd_steps=3, seed=7,
                                    **_stats(digits))

    def noise() -> object:
        return corruption_accuracy(digits.model, batches, corruptions=NOISE, seed=7, **_stats(digits))

    alone = {"pgd": pgd(), "noise": noise()}
    got: dict[str, object] = {}
    jobs = [threading.Thread(target=lambda k=k, f=f: got.__setitem__(k, f())) for k, f in (("pgd", pgd),
                                                                                           ("noise", noise))]
    drawn: list[float] = []
    torch.manual_seed(1234)

    def draw() -> None:
        while any(j.is_alive() for j in jobs) or len(drawn) < 50:
            drawn.append(float(torch.rand(1)))

    drawer = threading.Thread(target=draw)
    for j in jobs:
        j.start()
    drawer.start()
    for t in (*jobs, drawer):
        t.join(timeout=120)
    assert got == alone
    torch.manual_seed(1234)
    expected = [float(torch.rand(1)) for _ in drawn]
    assert drawn == expected, "the global RNG stream was reseeded or rewound by an evaluation"


def test_mean_and_std_default_to_the_model_preset(digits: Digits) -> None:
    loader = digits.loader(n=64)
    explicit = adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[0.1], **_stats(digits))
    implicit = adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[0.1], device="cpu")
    assert implicit == explicit
    pixels, labels = digits.pixels[:32], digits.labels[:32]
    torch.testing.assert_close(
        fgsm_perturb(digits.model, pixels, labels, 0.1),
        fgsm_perturb(digits.model, pixels, labels, 0.1, mean=digits.mean, std=digits.std),
    )
    bare = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # built outside the registry: no preset
    with pytest.raises(ConfigError, match=r"mean=\.\.\. and std="):
        adversarial_accuracy(bare, loader, attack="fgsm", eps=[0.1], device="cpu")
    with pytest.raises(ConfigError, match="both mean and std"):
        adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[0.1], mean=digits.mean, device="cpu")


@pytest.mark.parametrize("eps", [2 / 255, 0.1])
def test_adversarial_images_stay_in_the_eps_ball_and_in_range(digits: Digits, eps: float) -> None:
    pixels, labels = digits.pixels[:100], digits.labels[:100]
    fgsm = fgsm_perturb(digits.model, pixels, labels, eps, mean=digits.mean, std=digits.std)
    pgd = pgd_perturb(digits.model, pixels, labels, eps, mean=digits.mean, std=digits.std, steps=5)
    for adv in (fgsm, pgd):
        assert adv.shape == pixels.shape and adv.dtype == pixels.dtype
        assert not adv.requires_grad
        assert float((adv - pixels).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    # FGSM moves every unclipped pixel with a non-zero gradient by exactly ±ε (a real signed-gradient step).
    interior = (pixels >= eps) & (pixels <= 1 - eps)
    moved = (fgsm - pixels).abs()[interior]
    assert float((moved - eps).abs().lt(1e-6).float().mean()) > 0.9
    # Pixels at the ends of the range can only move inwards, so the clamp to [0, 1] is really exercised.
    assert bool((pixels == 0).any()) and bool((fgsm[pixels == 0] >= 0).all())


def test_adversarial_images_fool_the_model(digits: Digits) -> None:
    pixels, labels = digits.pixels[:100], digits.labels[:100]
    adv = pgd_perturb(digits.model, pixels, labels, 0.2, mean=digits.mean, std=digits.std)
    with torch.no_grad():
        clean = (digits.model(digits.normalise(pixels)).argmax(1) == labels).float().mean()
        attacked = (digits.model(digits.normalise(adv)).argmax(1) == labels).float().mean()
    assert float(attacked) < float(clean) - 0.5


def test_train_mode_is_restored_and_batchnorm_is_untouched(digits: Digits) -> None:
    model = digits.model
    bn = model.bn1
    reference = digits.clean_accuracy(n=64)  # the fixture model is in eval mode here
    running_mean = bn.running_mean.clone()
    model.train()
    model.layer2.eval()  # a submodule deliberately left in eval mode must stay so
    loader = digits.loader(n=64)
    try:
        result = adversarial_accuracy(model, loader, attack="fgsm", eps=[0.0, 0.05], **_stats(digits))
        assert model.training and bn.training and not model.layer2.training
        adversarial_accuracy(model, loader, attack="pgd", eps=[0.05], pgd_steps=2, **_stats(digits))
        assert model.training and bn.training and not model.layer2.training
        corruption_accuracy(model, loader, corruptions=("contrast",), severities=(1,), **_stats(digits))
        assert model.training and bn.training and not model.layer2.training
        evaluate_robustness(model, loader, kinds=("fgsm",), eps=[0.01], **_stats(digits))
        assert model.training and bn.training and not model.layer2.training
        assert torch.equal(bn.running_mean, running_mean), "evaluation must run BatchNorm in eval mode"
        assert result.accuracy_at(0.0) == reference
    finally:
        model.eval()


def test_max_samples_takes_the_first_samples(digits: Digits) -> None:
    capped = adversarial_accuracy(
        digits.model,
        digits.loader(batch_size=32),
        attack="pgd",
        eps=[0, 0.1],
        pgd_steps=3,
        max_samples=50,
        **_stats(digits),
    )
    exact = adversarial_accuracy(
        digits.model,
        digits.loader(n=50, batch_size=32),
        attack="pgd",
        eps=[0, 0.1],
        pgd_steps=3,
        **_stats(digits),
    )
    assert capped == exact
    assert capped.accuracy_at(0) == digits.clean_accuracy(n=50)


def test_progress_and_cancel(digits: Digits) -> None:
    calls: list[tuple[int, int | None, str]] = []
    adversarial_accuracy(
        digits.model,
        digits.loader(batch_size=50),
        attack="fgsm",
        eps=[0.05],
        max_samples=120,
        progress=lambda done, total, message: calls.append((done, total, message)),
        **_stats(digits),
    )
    assert calls[-1][:2] == (120, 120)
    assert [c[0] for c in calls] == [0, 50, 100, 120]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        adversarial_accuracy(
            digits.model, digits.loader(), attack="fgsm", eps=[0.05], cancel=token, **_stats(digits)
        )
    with pytest.raises(Cancelled):
        corruption_accuracy(digits.model, digits.loader(), cancel=token, **_stats(digits))


def test_adversarial_argument_errors(digits: Digits) -> None:
    loader = digits.loader(n=10)
    with pytest.raises(ConfigError, match="attack"):
        adversarial_accuracy(digits.model, loader, attack="cw", eps=[0.1], **_stats(digits))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[-0.1], **_stats(digits))
    with pytest.raises(ConfigError, match="8/255"):
        adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[8], **_stats(digits))
    with pytest.raises(ConfigError):
        adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[], **_stats(digits))
    with pytest.raises(ConfigError, match="channel"):
        adversarial_accuracy(
            digits.model, loader, attack="fgsm", eps=[0.1], mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)
        )
    with pytest.raises(ConfigError):
        adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[0.1], mean=(0.5,), std=(0.0,))
    with pytest.raises(ConfigError, match="max_samples"):
        adversarial_accuracy(digits.model, loader, attack="fgsm", eps=[0.1], max_samples=0, **_stats(digits))
    with pytest.raises(ConfigError, match="pgd_steps"):
        adversarial_accuracy(digits.model, loader, attack="pgd", eps=[0.1], pgd_steps=0, **_stats(digits))
    with pytest.raises(ConfigError, match="pgd_step_size"):
        evaluate_robustness(digits.model, loader, kinds="pgd", pgd_step_size=-1.0, **_stats(digits))
    with pytest.raises(DataError, match="no samples"):
        adversarial_accuracy(digits.model, [], attack="fgsm", eps=[0.1], **_stats(digits))


def test_explicit_pgd_step_size_is_used(digits: Digits) -> None:
    loader = digits.loader(n=100)
    tiny = adversarial_accuracy(
        digits.model, loader, attack="pgd", eps=[0.2], pgd_steps=2, pgd_step_size=1e-4, **_stats(digits)
    )
    default = adversarial_accuracy(
        digits.model, loader, attack="pgd", eps=[0.2], pgd_steps=2, **_stats(digits)
    )
    assert tiny.accuracy_at(0.2) > default.accuracy_at(0.2), "a negligible step should barely leave the start"
    report = evaluate_robustness(
        digits.model, loader, kinds="pgd", eps=[0.2], pgd_steps=2, pgd_step_size=1e-4, **_stats(digits)
    )
    assert report.pgd == tiny
    assert report.settings["pgd_step_size"] == 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Corruptions: tensors
# ---------------------------------------------------------------------------------------------------------------


def test_table_choice_by_image_size() -> None:
    assert corruption_table_for(32, 32) == "cifar10-c"
    assert corruption_table_for(8, 8) == "cifar10-c"
    assert corruption_table_for(64, 64) == "cifar10-c"
    assert corruption_table_for(65, 32) == "imagenet-c"
    assert corruption_table_for(224, 224) == "imagenet-c"
    assert set(CORRUPTION_TABLES["cifar10-c"]) == set(CORRUPTIONS) == set(CORRUPTION_TABLES["imagenet-c"])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_keeps_shape_dtype_range_and_is_seeded(name: str) -> None:
    for channels, size in ((3, 32), (1, 8), (3, 8)):
        images = _smooth_images(3, channels, size, seed=1)
        for severity in range(1, 6):
            out = corrupt(images, name, severity, seed=5)
            assert out.shape == images.shape and out.dtype == images.dtype
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
            assert torch.equal(out, corrupt(images, name, severity, seed=5)), "same seed, same output"
            assert not torch.equal(out, images), f"{name} severity {severity} changed nothing"
            other = corrupt(images, name, severity, seed=6)
            if name in NOISE:
                assert not torch.equal(out, other), "a different seed must give different noise"
            else:
                assert torch.equal(out, other), "deterministic corruptions ignore the seed"
    doubles = _smooth_images(2, 3, 32).double()
    assert corrupt(doubles, name, 3).dtype == torch.float64
    single = _smooth_images(1, 3, 32)[0]
    assert torch.equal(corrupt(single, name, 2, seed=4), corrupt(single[None], name, 2, seed=4)[0])


@pytest.mark.parametrize("size", [32, 224])
def test_every_corruption_works_at_cifar_and_imagenet_sizes(size: int) -> None:
    images = _smooth_images(2, 3, size)
    for name in CORRUPTIONS:
        distortion = []
        for severity in range(1, 6):
            out = corrupt(images, name, severity)
            assert out.shape == images.shape
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
            distortion.append(float((out - images).pow(2).mean()))
        assert distortion[4] > distortion[0], f"{name}: severity 5 must distort more than severity 1"


def test_corruption_rejects_bad_arguments() -> None:
    images = _smooth_images(1, 3, 32)
    with pytest.raises(ConfigError, match="unknown corruption"):
        corrupt(images, "fog", 1)
    for severity in (0, 6, 2.5):
        with pytest.raises(ConfigError, match="severity"):
            corrupt(images, "contrast", severity)  # type: ignore[arg-type]
    with pytest.raises(DataError):
        corrupt((images * 255).to(torch.uint8), "contrast", 1)
    with pytest.raises(DataError):
        corrupt(torch.rand(2, 4, 16, 16), "jpeg_compression", 1)


def test_pixelate_matches_pillow_box_resampling() -> None:
    generator = torch.Generator().manual_seed(0)
    for size in (32, 224, 8, 17):
        table = CORRUPTION_TABLES[corruption_table_for(size, size)]["pixelate"]
        image = torch.rand(1, 1, size, size, generator=generator)
        pil = Image.fromarray(image[0, 0].numpy(), mode="F")
        for severity in range(1, 6):
            small = int(size * table[severity - 1])
            reference = np.asarray(pil.resize((small, small), Image.BOX).resize((size, size), Image.BOX))
            ours = corrupt(image, "pixelate", severity)[0, 0].numpy()
            np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_hsv_round_trip_matches_colorsys() -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images[0, :, 0, 0] = 0.0  # black
    images[0, :, 0, 1] = 0.5  # grey
    images[0, :, 0, 2] = torch.tensor([0.7, 0.7, 0.2])  # red/green tie
    hsv = rgb_to_hsv(images)
    flat_rgb = images.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    flat_hsv = hsv.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    for rgb, ours in zip(flat_rgb, flat_hsv, strict=True):
        assert ours == pytest.approx(colorsys.rgb_to_hsv(*rgb), abs=1e-5)
    torch.testing.assert_close(hsv_to_rgb(hsv), images, atol=1e-5, rtol=0)


def test_brightness_raises_value_keeping_hue_and_saturation() -> None:
    images = _smooth_images(2, 3, 32)
    images[0, :, 0, 0] = 0.0
    for severity, amount in enumerate(CORRUPTION_TABLES["cifar10-c"]["brightness"], start=1):
        out = corrupt(images, "brightness", severity)
        value = images.amax(dim=1, keepdim=True)
        new_value = (value + amount).clamp(max=1.0)
        # With H and S fixed, RGB scales linearly with V; a black pixel becomes grey at the new value.
        expected = torch.where(
            value > 0, images * new_value / value.clamp_min(1e-12), new_value.expand_as(images)
        )
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    grey = _smooth_images(2, 1, 32)
    torch.testing.assert_close(corrupt(grey, "brightness", 5), (grey + 0.3).clamp(0, 1))


def test_defocus_kernel_and_blur() -> None:
    # CIFAR severity 1: a radius-0.3 disk is one pixel, so the kernel is a 3×3 Gaussian with σ = 0.4.
    w = math.exp(-1 / (2 * 0.4**2))
    g = torch.tensor([w, 1.0, w], dtype=torch.float64) / (1 + 2 * w)
    torch.testing.assert_close(disk_kernel(0.3, 0.4), torch.outer(g, g))
    for radius, blur in CORRUPTION_TABLES["imagenet-c"]["defocus_blur"]:
        kernel = disk_kernel(radius, blur)
        assert kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
        assert kernel.shape[0] <= 2 * math.ceil(radius) + 5
        torch.testing.assert_close(kernel, kernel.flip(0).flip(1))
        assert abs(float(kernel.sum()) - 1.0) < 0.02
    flat = torch.full((2, 3, 32, 32), 0.4)
    torch.testing.assert_close(corrupt(flat, "defocus_blur", 5), flat)
    images = _smooth_images(2, 3, 32)
    blurred = corrupt(images, "defocus_blur", 5)
    assert float(blurred.diff(dim=-1).abs().mean()) < float(images.diff(dim=-1).abs().mean())


def test_contrast_keeps_channel_means_and_scales_deviation() -> None:
    images = _smooth_images(2, 3, 32)
    for severity, factor in enumerate(CORRUPTION_TABLES["cifar10-c"]["contrast"], start=1):
        out = corrupt(images, "contrast", severity)
        torch.testing.assert_close(out.mean(dim=(-2, -1)), images.mean(dim=(-2, -1)), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            out.std(dim=(-2, -1)), images.std(dim=(-2, -1)) * factor, atol=1e-5, rtol=0
        )


def test_noise_statistics_follow_the_table() -> None:
    grey = torch.full((4, 3, 224, 224), 0.5)
    sigma = CORRUPTION_TABLES["imagenet-c"]["gaussian_noise"][0]
    noise = corrupt(grey, "gaussian_noise", 1, seed=0) - grey
    assert abs(float(noise.std()) - sigma) < 0.005 and abs(float(noise.mean())) < 0.005
    amount = CORRUPTION_TABLES["imagenet-c"]["impulse_noise"][4]
    impulse = corrupt(grey, "impulse_noise", 5, seed=0)
    changed = impulse != grey
    assert abs(float(changed.float().mean()) - amount) < 0.01
    assert set(impulse[changed].unique().tolist()) == {0.0, 1.0}
    photons = CORRUPTION_TABLES["imagenet-c"]["shot_noise"][0]
    shot = corrupt(grey, "shot_noise", 1, seed=0)
    assert abs(float(shot.mean()) - 0.5) < 0.01
    assert torch.allclose(shot * photons, (shot * photons).round(), atol=1e-4), "Poisson counts / λ"


def test_jpeg_is_a_real_round_trip() -> None:
    images = _smooth_images(3, 3, 32) + 0.03 * torch.randn(
        3, 3, 32, 32, generator=torch.Generator().manual_seed(1)
    )
    images = images.clamp(0, 1)
    light = corrupt(images, "jpeg_compression", 1)
    heavy = corrupt(images, "jpeg_compression", 5)
    for out in (light, heavy):
        torch.testing.assert_close(out * 255, (out * 255).round(), atol=1e-3, rtol=0)  # 8-bit decoded values
    assert float((heavy - images).abs().mean()) > float((light - images).abs().mean())
    grey = images[:, :1]
    assert corrupt(grey, "jpeg_compression", 3).shape == grey.shape


# ---------------------------------------------------------------------------------------------------------------
# Corruption accuracy and the combined report
# ---------------------------------------------------------------------------------------------------------------


def test_corruption_accuracy_severity_five_hurts_more(digits: Digits) -> None:
    loader = digits.loader(n=200, batch_size=100)
    result = corruption_accuracy(digits.model, loader, seed=0, **_stats(digits))
    assert isinstance(result, CorruptionResult)
    assert result.corruptions == CORRUPTIONS and result.severities == (1, 2, 3, 4, 5)
    assert result.table == "cifar10-c"
    for row in result.accuracy.values():
        assert all(0.0 <= acc <= 100.0 for acc in row)
    means = result.mean_per_severity()
    assert result.mean_at(5) == means[4] < means[0] - 10, means
    assert means[0] == pytest.approx(sum(result.accuracy_at(n, 1) for n in CORRUPTIONS) / len(CORRUPTIONS))
    assert result.mean() == pytest.approx(sum(means) / 5)
    # Seeded: the same corrupted images on every run, also when only some corruptions/severities are asked for.
    again = corruption_accuracy(
        digits.model, loader, corruptions=NOISE, severities=(5, 1), seed=0, **_stats(digits)
    )
    assert again.severities == (5, 1)
    for name in NOISE:
        assert again.accuracy[name] == (result.accuracy_at(name, 5), result.accuracy_at(name, 1))
    with pytest.raises(ConfigError, match=r"severity 3 was not measured; measured: \[5, 1\]"):
        again.accuracy_at("shot_noise", 3)
    with pytest.raises(ConfigError, match="corruption 'contrast' was not measured"):
        again.accuracy_at("contrast", 1)


def test_evaluate_robustness_returns_a_typed_record_that_round_trips_through_json(digits: Digits) -> None:
    loader = digits.loader(batch_size=64)
    report = evaluate_robustness(
        digits.model, loader, eps=(0.0, 2 / 255, 0.1), max_samples=100, pgd_steps=3, **_stats(digits)
    )
    assert isinstance(report, RobustnessResult) and report.kinds == ("fgsm", "pgd", "corruptions")
    assert report.samples == 100
    assert report.clean_accuracy == digits.clean_accuracy(n=100)
    assert report.fgsm.accuracy_at(0.0) == report.pgd.accuracy_at(0.0) == report.clean_accuracy
    assert report.fgsm.eps == (0.0, 2 / 255, 0.1)
    assert report.pgd.accuracy_at(0.1) <= report.fgsm.accuracy_at(0.1)
    assert report.attack("pgd") is report.pgd
    assert report.settings["corruption_table"] == "cifar10-c" == report.corruptions.table
    assert report.settings["pgd_steps"] == 3
    assert report.settings["accuracy_units"] == "percent"
    # one naming scheme in the JSON form; ε and severities as lists, never as dict keys
    decoded = json.loads(json.dumps(report.to_dict()))
    assert set(decoded) == {"samples", "clean_accuracy", "accuracy_units", "fgsm", "pgd", "corruptions",
                            "settings"}
    assert decoded["fgsm"] == {"attack": "fgsm", "eps": [0.0, 2 / 255, 0.1], "accuracy": list(report.fgsm.accuracy)}
    assert set(decoded["corruptions"]) == {"table", "severities", "accuracy", "mean_per_severity"}
    assert decoded["corruptions"]["mean_per_severity"] == list(report.corruptions.mean_per_severity())
    assert RobustnessResult.from_dict(decoded) == report
    # ε computed another way (and after JSON) still finds its accuracy; an unmeasured one is a clear error
    assert report.fgsm.accuracy_at(2.0 / 255.0) == report.fgsm.accuracy[1] == report.fgsm.accuracy_at(0.00784313725490196)
    with pytest.raises(ConfigError, match=r"fgsm was not measured at ε = 8/255; measured: 0/255, 2/255, 25.5/255"):
        report.fgsm.accuracy_at(8 / 255)
    separate = adversarial_accuracy(
        digits.model,
        loader,
        attack="pgd",
        eps=(0.0, 2 / 255, 0.1),
        pgd_steps=3,
        max_samples=100,
        **_stats(digits),
    )
    assert separate == report.pgd, "one pass or separate calls give the same numbers"

    only = evaluate_robustness(digits.model, loader, kinds="corruptions", max_samples=64, **_stats(digits))
    assert only.kinds == ("corruptions",) and only.fgsm is None and only.pgd is None
    assert only.corruptions.severities == (1, 2, 3, 4, 5)
    assert set(only.corruptions.corruptions) == set(CORRUPTIONS)
    assert set(only.to_dict()) == {"samples", "clean_accuracy", "accuracy_units", "corruptions", "settings"}
    with pytest.raises(ConfigError, match="fgsm was not measured; measured: corruptions"):
        only.attack("fgsm")

    defaults = evaluate_robustness(digits.model, loader, kinds="fgsm", max_samples=32, device="cpu")
    assert defaults.fgsm.eps == DEFAULT_EPS == (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    assert defaults.settings["eps"] == list(DEFAULT_EPS)
    assert defaults.settings["mean"] == list(digits.mean) and defaults.settings["device"] == "cpu"
    with pytest.raises(ConfigError, match="kind"):
        evaluate_robustness(digits.model, loader, kinds=("fgsm", "autoattack"), **_stats(digits))


def test_results_read_the_layout_written_before_the_records() -> None:
    # reports and benchmarks/results/robustness.json written by earlier versions stay readable
    old = {
        "clean_accuracy": 90.0, "samples": 100, "settings": {"seed": 0},
        "fgsm": {"0.00392156862745098": 80.0, "0.03137254901960784": 20.0},
        "pgd": {str(1 / 255): 70.0, str(8 / 255): 5.0},
        "corruptions": {"contrast": {"1": 88.0, "2": 70.0}, "brightness": {"1": 89.0, "2": 86.0}},
        "corruption_mean_per_severity": {"1": 88.5, "2": 78.0},
    }
    rec = RobustnessResult.from_dict(old)
    assert rec.fgsm.points() == [(1 / 255, 80.0), (8 / 255, 20.0)]
    assert rec.pgd.accuracy_at(8 / 255) == 5.0
    assert rec.corruptions.severities == (1, 2)
    assert rec.corruptions.mean_per_severity() == (88.5, 78.0)


def test_records_reject_fractions_and_mismatched_lengths() -> None:
    with pytest.raises(ConfigError, match=r"percentage in \[0, 100\]"):
        RobustnessResult(samples=10, clean_accuracy=150.0)
    with pytest.raises(ConfigError, match="2 budgets but 1 accuracies"):
        AttackCurve("fgsm", (0.0, 0.1), (50.0,))
    with pytest.raises(ConfigError, match="is given twice"):
        AttackCurve("fgsm", (2 / 255, 2.0 / 255.0), (50.0, 40.0))
    with pytest.raises(ConfigError, match="1 accuracies for 2 severities"):
        CorruptionResult((1, 2), {"contrast": (50.0,)})


def test_a_spec_says_once_what_to_measure(digits: Digits) -> None:
    spec = RobustnessSpec(kinds="pgd,corruptions", eps="0,2/255", pgd_steps=2, corruptions=NOISE, severities=(5,),
                          max_samples=40, seed=3, mean=digits.mean, std=digits.std)
    assert spec.kinds == ("pgd", "corruptions") and spec.eps == (0.0, 2 / 255)
    loader = digits.loader(n=80, batch_size=40)
    by_spec = evaluate_robustness(digits.model, loader, spec, device="cpu")
    by_keywords = evaluate_robustness(digits.model, loader, kinds=("pgd", "corruptions"), eps=[0.0, 2 / 255],
                                      pgd_steps=2, corruptions=NOISE, severities=(5,), max_samples=40, seed=3,
                                      mean=digits.mean, std=digits.std, device="cpu")
    assert by_spec == by_keywords
    assert by_spec.corruptions.corruptions == NOISE and by_spec.corruptions.severities == (5,)
    assert by_spec.settings["corruptions"] == list(NOISE)
    # keywords override the spec's fields
    more = evaluate_robustness(digits.model, loader, spec, kinds="fgsm", device="cpu")
    assert more.kinds == ("fgsm",) and more.fgsm.eps == (0.0, 2 / 255)
    with pytest.raises(ConfigError, match=r"unknown robustness setting.*epsilon.*choose from"):
        evaluate_robustness(digits.model, loader, epsilon=[0.1], device="cpu")
    with pytest.raises(ConfigError, match="severity=6"):
        RobustnessSpec(severities=(6,))
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        RobustnessSpec(corruptions=("fog",))
    assert RobustnessSpec(**spec.to_dict()) == spec
