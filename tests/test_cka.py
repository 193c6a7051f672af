"""CKA math: reference values, invariances, estimator agreement and numerics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cka_analysis.cka import CKAOptions, MinibatchCKA, cka_matrix, gram_linear, hsic, linear_cka, rbf_cka
from cka_analysis.errors import ConfigError


@pytest.fixture(scope="module")
def xy() -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = x + np.random.randn(100, 10)
    return x, y


def test_reference_values(xy):
    x, y = xy
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=1e-5)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=1e-5)
    assert rbf_cka(x, y, threshold=0.5) == pytest.approx(0.65483, abs=1e-5)


def test_reference_values_match_brute_force_hsic(xy):
    """The closed forms agree with HSIC computed from its textbook definition."""
    x, y = (torch.from_numpy(a - a.mean(0)) for a in xy)
    k, l = gram_linear(x), gram_linear(y)
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    biased = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    assert linear_cka(*xy) == pytest.approx(float(biased(k, l) / (biased(k, k) * biased(l, l)).sqrt()), abs=1e-12)

    def unbiased(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # Song et al. 2012, eq. 5
        a, b = a.clone().fill_diagonal_(0), b.clone().fill_diagonal_(0)
        one = torch.ones(n, dtype=torch.float64)
        return (torch.trace(a @ b) + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ a @ b @ one)) / (n * (n - 3))

    expected = unbiased(k, l) / (unbiased(k, k) * unbiased(l, l)).sqrt()
    assert linear_cka(*xy, debiased=True) == pytest.approx(float(expected), abs=1e-12)
    assert float(hsic(k, l, debiased=True)) == pytest.approx(float(unbiased(k, l)), rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_feature_and_gram_forms_agree(debiased):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 5))
    y = x @ rng.normal(size=(5, 7)) + rng.normal(size=(30, 7))
    # 5 and 7 features < 30 samples: feature form; padding with 40 zero columns forces the Gram form
    pad = lambda a: np.concatenate([a, np.zeros((30, 40))], axis=1)  # noqa: E731
    assert linear_cka(x, y, debiased=debiased) == pytest.approx(linear_cka(pad(x), pad(y), debiased=debiased),
                                                                abs=1e-10)


@pytest.mark.parametrize("fn", [linear_cka, lambda a, b, **k: rbf_cka(a, b, threshold=0.5, **k)])
@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(xy, fn, debiased):
    x, y = xy
    base = fn(x, y, debiased=debiased)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 10)))
    assert fn(x @ q, y, debiased=debiased) == pytest.approx(base, abs=1e-8)
    assert fn(x, y @ q, debiased=debiased) == pytest.approx(base, abs=1e-8)
    assert fn(3.7 * x, y, debiased=debiased) == pytest.approx(base, abs=1e-8)
    assert fn(x, 0.01 * y, debiased=debiased) == pytest.approx(base, abs=1e-8)
    assert fn(y, x, debiased=debiased) == pytest.approx(base, abs=1e-12)


def test_identical_is_one_and_independent_is_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 50))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    a, b = rng.normal(size=(200, 2000)), rng.normal(size=(200, 2000))
    assert abs(linear_cka(a, b, debiased=True)) < 0.02
    assert linear_cka(a, b) > 0.5  # the biased estimator is far from 0 for wide layers: why debiasing exists


def test_accepts_tensors_and_flattens_trailing_axes():
    t = torch.randn(20, 3, 4, 4)
    assert linear_cka(t, t.reshape(20, -1).numpy()) == pytest.approx(1.0)


def test_float32_offset_relu_features_match_float64():
    rng = np.random.default_rng(0)
    base = np.maximum(rng.normal(size=(256, 64)), 0)
    other = np.maximum(base @ rng.normal(size=(64, 64)) * 0.1 + rng.normal(size=(256, 64)), 0)
    x32, y32 = (torch.tensor(a + 100, dtype=torch.float32) for a in (base, other))
    ref = linear_cka(base + 100, other + 100, debiased=True)
    got = linear_cka(x32, y32, debiased=True)
    assert np.isfinite(got)
    assert got == pytest.approx(ref, abs=1e-4)
    acc = MinibatchCKA()
    for i in range(0, 256, 64):
        acc.update([x32[i:i + 64]], [y32[i:i + 64]])
    acc64 = MinibatchCKA()
    for i in range(0, 256, 64):
        acc64.update([torch.tensor(base[i:i + 64] + 100)], [torch.tensor(other[i:i + 64] + 100)])
    assert torch.isfinite(acc.compute()).all()
    assert float(acc.compute()[0, 0]) == pytest.approx(float(acc64.compute()[0, 0]), abs=1e-4)


def test_constant_features_give_zero_not_nan():
    x = np.ones((20, 5))
    y = np.random.default_rng(0).normal(size=(20, 5))
    assert linear_cka(x, y) == 0.0
    assert linear_cka(x, y, debiased=True) == 0.0
    acc = MinibatchCKA()
    acc.update([torch.ones(16, 5), torch.randn(16, 5)])
    m = acc.compute()
    assert torch.isfinite(m).all() and m[0, 1] == 0


def test_input_validation():
    with pytest.raises(ConfigError, match="same examples"):
        linear_cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(ConfigError, match="at least 4"):
        linear_cka(np.random.randn(3, 2), np.random.randn(3, 2), debiased=True)
    with pytest.raises(ConfigError, match="NaN"):
        linear_cka(np.array([[np.nan], [1], [2], [3]]), np.ones((4, 1)))
    with pytest.raises(ConfigError, match="threshold"):
        rbf_cka(np.random.randn(8, 2), np.random.randn(8, 2), threshold=0)
    with pytest.raises(ConfigError, match="kernel"):
        MinibatchCKA(kernel="poly")


def test_minibatch_one_batch_equals_debiased(xy):
    x, y = (torch.from_numpy(a) for a in xy)
    acc = MinibatchCKA()
    acc.update([x], [y])
    assert float(acc.compute()[0, 0]) == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-12)
    sym = MinibatchCKA()
    sym.update([x, y])
    m = sym.compute()
    assert m.shape == (2, 2)
    assert torch.allclose(m, m.T) and float(m[0, 0]) == pytest.approx(1.0)
    assert float(m[0, 1]) == pytest.approx(linear_cka(x, y, debiased=True), abs=1e-12)


def test_minibatch_rbf_and_biased_single_batch(xy):
    x, y = (torch.from_numpy(a) for a in xy)
    acc = MinibatchCKA(kernel="rbf", threshold=0.5, debiased=False)
    acc.update([x], [y])
    assert float(acc.compute()[0, 0]) == pytest.approx(rbf_cka(x, y, threshold=0.5), abs=1e-12)


def test_minibatch_stable_across_batch_sizes():
    g = torch.Generator().manual_seed(0)
    n = 4096
    z = torch.randn(n, 16, generator=g)
    layers = [
        torch.relu(z @ torch.randn(16, 64, generator=g)),
        torch.relu(z @ torch.randn(16, 32, generator=g)) + 0.5 * torch.randn(n, 32, generator=g),
        torch.randn(n, 48, generator=g),
    ]
    results = []
    for bs in (16, 64, 256):
        acc = MinibatchCKA()
        for i in range(0, n, bs):
            acc.update([f[i:i + bs] for f in layers])
        results.append(acc.compute())
    for r in results[1:]:
        assert torch.allclose(r, results[0], atol=0.01), (r, results[0])


def test_merge_equals_single_accumulator():
    feats = [torch.randn(128, 8), torch.randn(128, 4, 2)]
    whole, left, right = MinibatchCKA(), MinibatchCKA(), MinibatchCKA()
    for i in range(0, 128, 32):
        batch = [f[i:i + 32] for f in feats]
        whole.update(batch)
        (left if i < 64 else right).update(batch)
    merged = left.merge(right)
    assert torch.allclose(merged.compute(), whole.compute(), atol=1e-12)
    assert merged.samples == 128
    with pytest.raises(ConfigError, match="merge"):
        other = MinibatchCKA()
        other.update([torch.randn(8, 2)])
        merged.merge(other)


def test_small_batches_are_folded_or_rejected():
    x = torch.randn(10, 3)
    acc = MinibatchCKA()
    acc.update([x[:2]])  # too small: held back
    acc.update([x[2:]])  # folded in: one batch of 10
    ref = MinibatchCKA()
    ref.update([x])
    assert torch.allclose(acc.compute(), ref.compute())
    assert acc.samples == 10
    lonely = MinibatchCKA()
    lonely.update([x[:3]])
    with pytest.raises(ConfigError, match="at least 4"):
        lonely.compute()
    tail = MinibatchCKA()
    tail.update([x[:8]])
    tail.update([x[8:]])
    with pytest.warns(UserWarning, match="not used"):
        assert torch.isfinite(tail.compute()).all()


def test_update_validation():
    acc = MinibatchCKA()
    with pytest.raises(ConfigError, match="same examples"):
        acc.update([torch.randn(8, 2), torch.randn(7, 2)])
    acc.update([torch.randn(8, 2)])
    with pytest.raises(ConfigError, match="same layers"):
        acc.update([torch.randn(8, 2), torch.randn(8, 2)])
    with pytest.raises(ConfigError, match="no batch"):
        MinibatchCKA().compute()


class _TwoBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 6)
        self.act = torch.nn.ReLU()
        self.b = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.act(self.a(self.act(x))))  # act is called twice


def test_cka_matrix_numbered_calls_and_state_restored():
    model = _TwoBranch().train()
    data = [(torch.randn(16, 6), torch.zeros(16)) for _ in range(3)]
    res = cka_matrix(model, data, options=CKAOptions(device="cpu"), layers=["a", "act", "b"])
    assert res.names_a == ["act#1", "a", "act#2", "b"]
    assert res.matrix.shape == (4, 4)
    assert torch.allclose(torch.diagonal(res.matrix), torch.ones(4, dtype=torch.float64))
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(ConfigError, match="nope"):
        cka_matrix(model, data, options=CKAOptions(device="cpu"), layers=["a", "nope"])


def test_cka_matrix_model_a_vs_b_and_max_samples():
    torch.manual_seed(0)
    a, b = _TwoBranch(), _TwoBranch()
    data = [torch.randn(16, 6) for _ in range(4)]
    res = cka_matrix(a, data, model_b=b, layers=["a", "b"], layers_b=["b"], max_samples=40,
                     options=CKAOptions(device="cpu"))
    assert res.matrix.shape == (2, 1) and res.names_b == ["b"]
    same = cka_matrix(a, data, options=CKAOptions(device="cpu"), model_b=a, layers=["b"], layers_b=["b"])
    assert float(same.matrix[0, 0]) == pytest.approx(1.0)
