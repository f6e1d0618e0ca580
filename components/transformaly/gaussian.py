"""PCA keeping a fraction of the variance, one Gaussian with a ridge, and its negative log-likelihood.

Everything in float64 numpy. The NLL keeps every constant, so it equals
`-scipy.stats.multivariate_normal(mean, cov).logpdf(x)` for the ridged covariance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular


@dataclass(frozen=True)
class PCA:
    """x -> (x - mean) @ components.T. mean (D,), components (K, D) orthonormal rows, explained (K,) ratios."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        """x (N, D) -> (N, K) float64."""
        return (np.asarray(x, np.float64) - self.mean) @ self.components.T


def fit_pca(x: np.ndarray, variance: float) -> PCA:
    """The fewest leading principal components whose explained-variance ratios sum to >= `variance`.

    x (N, D) -> PCA with K <= min(N - 1, D) components (at least 1). Needs N >= 2.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 feature vectors (N, D), got shape {x.shape}")
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = singular**2
    total = var.sum()
    if total <= 0:
        raise ValueError("PCA: every training feature vector is identical (zero variance)")
    ratios = var / total
    k = int(np.searchsorted(np.cumsum(ratios), variance - 1e-12) + 1)
    k = max(1, min(k, len(ratios), x.shape[0] - 1))
    return PCA(mean, vt[:k].copy(), ratios[:k].copy())


@dataclass(frozen=True)
class Gaussian:
    """mean (D,), cov (D, D) ridged; chol (D, D) its lower Cholesky factor; logdet = log |cov|."""

    mean: np.ndarray
    cov: np.ndarray
    chol: np.ndarray
    logdet: float

    @classmethod
    def from_moments(cls, mean: np.ndarray, cov: np.ndarray) -> Gaussian:
        mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            raise ValueError("Gaussian covariance is not positive definite (raise the ridge)") from None
        return cls(mean, cov, chol, float(2.0 * np.log(np.diag(chol)).sum()))


def fit_gaussian(x: np.ndarray, ridge: float) -> Gaussian:
    """Maximum-likelihood mean and unbiased covariance of x (N, D), plus ridge * (mean variance) * I.

    The ridge is relative to trace(cov) / D, so it does not depend on the features' scale; a tiny absolute
    floor keeps the covariance invertible when the features do not vary at all.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"a Gaussian needs at least 2 feature vectors (N, D), got shape {x.shape}")
    mean = x.mean(axis=0)
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    scale = max(float(np.trace(cov)) / cov.shape[0], 1e-300)
    cov = cov + (ridge * scale + 1e-12 * scale) * np.eye(cov.shape[0])
    return Gaussian.from_moments(mean, cov)


def gaussian_nll(g: Gaussian, x: np.ndarray) -> np.ndarray:
    """-log N(x; mean, cov) = 0.5 * (Mahalanobis^2 + log|cov| + D log 2 pi). x (M, D) -> (M,) float64."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != g.mean.shape[0]:
        raise ValueError(f"expected features (M, {g.mean.shape[0]}), got {x.shape}")
    z = solve_triangular(g.chol, (x - g.mean).T, lower=True)  # (D, M): L z = x - mean
    maha = (z**2).sum(axis=0)
    return 0.5 * (maha + g.logdet + g.mean.shape[0] * math.log(2.0 * math.pi))
