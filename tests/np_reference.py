"""Independent float64 NumPy references, written from docs/spec.md with explicit loops.

Nothing here imports dhel_jax: these are the yardsticks the JAX code is held to (by the
tests, and on an accelerator by benchmarks/accelerator_check.py).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special


def normalize(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def lse(values) -> float:
    values = np.asarray(values, np.float64)
    top = values.max()
    return float(top + math.log(np.sum(np.exp(values - top))))


# ----------------------------------------------------------------------------- InfoNCE family


def info_nce(z1, z2, tau=0.1, symmetric=False):
    u, v = normalize(z1), normalize(z2)
    m = len(u)

    def one_way(a, b):
        return np.mean(
            [-a[i] @ b[i] / tau + lse([a[i] @ b[j] / tau for j in range(m)]) for i in range(m)]
        )

    return (one_way(u, v) + one_way(v, u)) / 2 if symmetric else one_way(u, v)


def _nt_xent(z1, z2, tau, kind, symmetric=True, sigma=0.5):
    u, v = normalize(z1), normalize(z2)
    m = len(u)
    w = np.concatenate([u, v])
    raw_pos = np.array([u[i] @ v[i] for i in range(m)])
    soft = np.exp(raw_pos / sigma) / np.sum(np.exp(raw_pos / sigma))
    weight = 2.0 - m * soft
    terms = []
    for a in range(2 * m if symmetric else m):
        p = (a + m) % (2 * m)
        cands = [
            w[a] @ w[b] / tau
            for b in range(2 * m)
            if b != a and not (kind in ("dcl", "dclw") and b == p)
        ]
        pos = w[a] @ w[p] / tau
        if kind == "dclw":
            pos = weight[a % m] * pos
        terms.append(-pos + lse(cands))
    return float(np.mean(terms))


def simclr(z1, z2, tau=0.5, symmetric=True):
    return _nt_xent(z1, z2, tau, "simclr", symmetric)


def dcl(z1, z2, tau=0.1, symmetric=True):
    return _nt_xent(z1, z2, tau, "dcl", symmetric)


def dclw(z1, z2, tau=0.1, sigma=0.5, symmetric=True):
    return _nt_xent(z1, z2, tau, "dclw", symmetric, sigma)


def dhel(z1, z2, tau=0.3, include_augs=True):
    u, v = normalize(z1), normalize(z2)
    m = len(u)
    out = []
    for i in range(m):
        term = -u[i] @ v[i] / tau + lse([u[i] @ u[j] / tau for j in range(m) if j != i])
        if include_augs:
            term += lse([v[i] @ v[j] / tau for j in range(m) if j != i])
        out.append(term)
    return float(np.mean(out))


def nt_xent_accuracy(z1, z2, kind):
    """Fraction of anchors whose positive beats every negative of the loss's negative set."""
    u, v = normalize(z1), normalize(z2)
    m = len(u)
    if kind == "dhel":
        return float(
            np.mean([all(u[i] @ v[i] > u[i] @ u[j] for j in range(m) if j != i) for i in range(m)])
        )
    if kind == "info_nce":
        return float(
            np.mean([all(u[i] @ v[i] > u[i] @ v[j] for j in range(m) if j != i) for i in range(m)])
        )
    w = np.concatenate([u, v])
    hits = []
    for a in range(2 * m):
        p = (a + m) % (2 * m)
        hits.append(all(w[a] @ w[p] > w[a] @ w[b] for b in range(2 * m) if b not in (a, p)))
    return float(np.mean(hits))


# ----------------------------------------------------------------------------- kernels


def kernel_values(name: str, r: float, t: float) -> tuple[float, float]:
    """(K_U, K_A) at distance r, docs/spec.md "KCL kernels"."""
    if name == "gaussian":
        k = math.exp(-t * r * r)
        return k, k
    if name == "log":
        return -0.5 * math.log(t * r * r + 1), -math.log(t * r * r + 1)
    if name == "imq":
        k = t / math.sqrt(t * t + r * r)
        return k, k
    if name == "riesz":
        assert t < 0
        k = -(r ** abs(t))
        return k, k
    if name == "gaussian_riesz":
        energy = r ** (-t) if t > 0 else -(r ** abs(t))
        return energy, math.exp(-2 * r * r)
    raise ValueError(name)


def kcl(z1, z2, kernel="gaussian", t=2.0, gamma=16.0):
    u, v = normalize(z1), normalize(z2)
    m = len(u)

    def energy(x):
        vals = [
            kernel_values(kernel, float(np.linalg.norm(x[i] - x[j])), t)[0]
            for i in range(m)
            for j in range(i + 1, m)
        ]
        return float(np.mean(vals))

    align = np.mean(
        [kernel_values(kernel, float(np.linalg.norm(u[i] - v[i])), t)[1] for i in range(m)]
    )
    return -2 * align + gamma * (energy(u) + energy(v))


# ----------------------------------------------------------------------------- Wang & Isola


def alignment(x, y, alpha=2.0):
    a, b = normalize(x), normalize(y)
    return float(np.mean([np.linalg.norm(a[i] - b[i]) ** alpha for i in range(len(a))]))


def uniformity(x, t=2.0):
    a = normalize(x)
    m = len(a)
    vals = [-t * np.sum((a[i] - a[j]) ** 2) for i in range(m) for j in range(i + 1, m)]
    return lse(vals) - math.log(len(vals))


def align_uniform(z1, z2, alpha=2.0, t=2.0, lam=1.0):
    return alignment(z1, z2, alpha) + lam * (uniformity(z1, t) + uniformity(z2, t)) / 2


LOSSES = {
    "info_nce": info_nce,
    "simclr": simclr,
    "dcl": dcl,
    "dclw": dclw,
    "dhel": dhel,
    "kcl": kcl,
    "align_uniform": align_uniform,
}


# ----------------------------------------------------------------------------- metrics


def _rows(x, unit: bool) -> np.ndarray:
    """Rows scaled to unit norm when ``unit``, else as given (float64)."""
    return normalize(x) if unit else np.asarray(x, np.float64)


def effective_rank(x, normalize=True) -> float:
    s = np.linalg.svd(_rows(x, normalize), compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-np.sum(p * np.log(p))))


def rank(x, tol=1e-5, normalize=True) -> int:
    return int(np.linalg.matrix_rank(np.cov(_rows(x, normalize), rowvar=False), tol=tol))


def hyperspherical_energy(x, s) -> float:
    u = normalize(x)
    m = len(u)
    total = 0.0
    for i in range(m):
        for j in range(m):
            if i != j:
                r = np.linalg.norm(u[i] - u[j])
                total += -np.log(r) if s == 0 else r ** (-s)
    return total / (m * (m - 1))


def sorted_pair_cosines(x) -> np.ndarray:
    u = normalize(x)
    gram = u @ u.T
    return np.sort(np.clip(gram[np.triu_indices(len(u), 1)], -1.0, 1.0))


def wasserstein_uniformity(x) -> float:
    """int_{-1}^{1} |F_emp - F_d|, integrated exactly between consecutive sorted pair values.

    On [s_(k), s_(k+1)] the ECDF is k/N; F_d crosses that level at its quantile, and on each
    side the integral is |level * width - int F_d|, with int_{-1}^{t} F_d = y I_y(a, a) * 2 -
    I_y(a + 1, a), y = (1 + t)/2 (from int_0^y x beta(x) dx = a/(a+b) I_y(a+1, b)).
    """
    s = sorted_pair_cosines(x)
    n_pairs, d = len(s), np.shape(x)[1]
    a = (d - 1) / 2

    def antiderivative(t):
        y = np.clip((1 + t) / 2, 0.0, 1.0)
        return 2 * y * scipy.special.betainc(a, a, y) - scipy.special.betainc(a + 1, a, y)

    knots = np.concatenate([[-1.0], s, [1.0]])
    level = np.arange(n_pairs + 1) / n_pairs
    left, right = knots[:-1], knots[1:]
    cross = np.clip(2 * scipy.special.betaincinv(a, a, level) - 1, left, right)
    below = np.abs(level * (cross - left) - (antiderivative(cross) - antiderivative(left)))
    above = np.abs((antiderivative(right) - antiderivative(cross)) - level * (right - cross))
    return float(np.sum(below + above))


# ----------------------------------------------------------------------------- probes


def knn_predict(train, train_labels, queries, num_classes, k, temperature):
    """Weighted kNN in float64 by brute force: cosine similarities, the k most similar train
    rows, votes exp(s / temperature) per class, the class with the most weight."""
    train, queries = normalize(train), normalize(queries)
    sims = queries @ train.T
    predictions = np.empty(len(queries), np.int64)
    for i in range(len(queries)):
        neighbours = np.argsort(-sims[i], kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in neighbours:
            votes[train_labels[j]] += np.exp(sims[i, j] / temperature)
        predictions[i] = np.argmax(votes)
    return predictions
