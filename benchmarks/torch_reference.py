"""PyTorch eager baselines for ``bench_losses.py``, written from docs/spec.md.

Two formulations are given where they differ in cost:

* ``DENSE``: the strongest straightforward eager code a PyTorch user would
  write for each loss: ``F.normalize``, ``torch.mm`` similarity matrices, a
  masked ``torch.logsumexp`` (or the NT-Xent ``cross_entropy`` trick), and KCL
  energies from mm-based squared distances.
* ``PUBLISHED``: the published implementations' formulations, re-typed from
  their description (not copied): DHEL as ``exp`` of the similarity matrix,
  ``masked_fill``, ``sum`` and ``log`` (Koromilas et al., ICML 2024 repository),
  KCL energies as ``torch.pdist`` kernel means (same repository) and the
  Wang & Isola (2020) ``pdist`` uniformity.

Every function takes two (M, d) float tensors ``z1``, ``z2`` (row i of ``z2`` is
the positive of row i of ``z1``) and the docs/spec.md default hyper-parameters, and
returns a scalar tensor that autograd can differentiate. torch is only a
benchmark dependency (the ``bench`` extra); nothing in ``dhel_jax`` imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]


def _eye(m: int, device) -> Tensor:
    return torch.eye(m, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------- dense


def info_nce(z1: Tensor, z2: Tensor, *, tau: float = 0.1) -> Tensor:
    """``mean_i [-u_i.v_i/tau + LSE_j u_i.v_j/tau]``: cross-entropy over cross-view logits."""
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = torch.mm(u, v.t()) / tau
    return F.cross_entropy(logits, torch.arange(u.shape[0], device=u.device))


def simclr(z1: Tensor, z2: Tensor, *, tau: float = 0.5) -> Tensor:
    """NT-Xent over the 2M anchors of ``W = [u; v]``, self-similarity masked by -inf."""
    m = z1.shape[0]
    w = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (torch.mm(w, w.t()) / tau).masked_fill(_eye(2 * m, w.device), -math.inf)
    labels = (torch.arange(2 * m, device=w.device) + m) % (2 * m)
    return F.cross_entropy(logits, labels)


def _dcl_terms(z1: Tensor, z2: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Raw positive dot products (M,) and the negatives' LSE (2M,) without self and positive."""
    m = z1.shape[0]
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    w = torch.cat([u, v])
    eye = _eye(m, w.device)
    excluded = torch.cat([torch.cat([eye, eye], 1), torch.cat([eye, eye], 1)], 0)
    logits = (torch.mm(w, w.t()) / tau).masked_fill(excluded, -math.inf)
    return (u * v).sum(dim=1), torch.logsumexp(logits, dim=1)


def dcl(z1: Tensor, z2: Tensor, *, tau: float = 0.1) -> Tensor:
    """``mean_a [-a.p(a)/tau + LSE_{b not in {a, p(a)}} a.b/tau]`` over the 2M anchors."""
    pos, neg = _dcl_terms(z1, z2, tau)
    return (-torch.cat([pos, pos]) / tau + neg).mean()


def dclw(z1: Tensor, z2: Tensor, *, tau: float = 0.1, sigma: float = 0.5) -> Tensor:
    """DCL with the positive logit weighted by ``w_i = 2 - M softmax_i(u_i.v_i / sigma)``."""
    pos, neg = _dcl_terms(z1, z2, tau)
    weight = 2.0 - z1.shape[0] * torch.softmax(pos / sigma, dim=0)
    return (-torch.cat([weight * pos, weight * pos]) / tau + neg).mean()


def dhel(z1: Tensor, z2: Tensor, *, tau: float = 0.3, include_augs: bool = True) -> Tensor:
    """``mean_i [-u_i.v_i/tau + LSE_{j!=i} u_i.u_j/tau + LSE_{j!=i} v_i.v_j/tau]`` (masked LSE)."""
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    eye = _eye(u.shape[0], u.device)
    loss = -(u * v).sum(dim=1) / tau
    views = (u, v) if include_augs else (u,)
    for x in views:
        loss = loss + torch.logsumexp((torch.mm(x, x.t()) / tau).masked_fill(eye, -math.inf), dim=1)
    return loss.mean()


def _gaussian_energy_mm(x: Tensor, t: float) -> Tensor:
    """``mean_{i != j} exp(-t |x_i - x_j|^2)`` with ``|x_i - x_j|^2 = 2 - 2 x_i.x_j`` (unit rows)."""
    m = x.shape[0]
    sq = (2.0 - 2.0 * torch.mm(x, x.t())).clamp_min(0.0)
    k = torch.exp(-t * sq)
    return (k.sum() - k.diagonal().sum()) / (m * (m - 1))


def kcl(z1: Tensor, z2: Tensor, *, t: float = 2.0, gamma: float = 16.0) -> Tensor:
    """Gaussian KCL ``-2 mean_i K(u_i, v_i) + gamma (E(u) + E(v))`` with mm-based distances."""
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    align = torch.exp(-t * (u - v).pow(2).sum(dim=1)).mean()
    return -2.0 * align + gamma * (_gaussian_energy_mm(u, t) + _gaussian_energy_mm(v, t))


def _uniformity_mm(x: Tensor, t: float) -> Tensor:
    """``log mean_{i != j} exp(-t |x_i - x_j|^2)`` as a masked LSE over mm distances."""
    m = x.shape[0]
    sq = (2.0 - 2.0 * torch.mm(x, x.t())).clamp_min(0.0)
    logits = (-t * sq).masked_fill(_eye(m, x.device), -math.inf)
    return torch.logsumexp(logits.reshape(-1), dim=0) - math.log(m * (m - 1))


def align_uniform(
    z1: Tensor, z2: Tensor, *, alpha: float = 2.0, t: float = 2.0, lam: float = 1.0
) -> Tensor:
    """``mean_i |u_i - v_i|^alpha + lam (uniformity(u) + uniformity(v)) / 2``."""
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    align = (u - v).norm(dim=1).pow(alpha).mean()
    return align + lam * (_uniformity_mm(u, t) + _uniformity_mm(v, t)) / 2


# --------------------------------------------------------------------------- published


def dhel_published(
    z1: Tensor, z2: Tensor, *, tau: float = 0.3, include_augs: bool = True
) -> Tensor:
    """DHEL as in the paper's repository: ``exp`` of the similarity matrix, diagonal
    ``masked_fill(0)``, row sums, then ``-log(pos / (sum_u * sum_v))`` (no LSE)."""
    m = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), p=2, dim=1)
    u, v = z[:m], z[m:]
    eye = _eye(m, z.device)
    sim_u = torch.exp(torch.mm(u, u.t()) / tau).masked_fill(eye, 0)
    pos = torch.exp((u * v).sum(dim=-1) / tau)
    if include_augs:
        sim_v = torch.exp(torch.mm(v, v.t()) / tau).masked_fill(eye, 0)
        return -torch.log(pos / (sim_u.sum(dim=-1) * sim_v.sum(dim=-1))).mean()
    return -torch.log(pos / sim_u.sum(dim=-1)).mean()


def _gaussian_energy_pdist(x: Tensor, t: float) -> Tensor:
    return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean()


def kcl_published(z1: Tensor, z2: Tensor, *, t: float = 2.0, gamma: float = 16.0) -> Tensor:
    """Gaussian KCL as in the paper's repository: ``torch.pdist`` kernel means."""
    m = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), p=2, dim=1)
    u, v = z[:m], z[m:]
    energy = _gaussian_energy_pdist(u, t) + _gaussian_energy_pdist(v, t)
    alignment = 2 * (u - v).norm(p=2, dim=1).pow(2).mul(-t).exp().mean()
    return -alignment + gamma * energy


def align_uniform_published(
    z1: Tensor, z2: Tensor, *, alpha: float = 2.0, t: float = 2.0, lam: float = 1.0
) -> Tensor:
    """Wang & Isola (2020): ``pdist(x).pow(2).mul(-t).exp().mean().log()`` uniformity."""
    u, v = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    align = (u - v).norm(p=2, dim=1).pow(alpha).mean()
    unif_u = torch.pdist(u, p=2).pow(2).mul(-t).exp().mean().log()
    unif_v = torch.pdist(v, p=2).pow(2).mul(-t).exp().mean().log()
    return align + lam * (unif_u + unif_v) / 2


DENSE: dict[str, LossFn] = {
    "info_nce": info_nce,
    "simclr": simclr,
    "dcl": dcl,
    "dclw": dclw,
    "dhel": dhel,
    "kcl": kcl,
    "align_uniform": align_uniform,
}

PUBLISHED: dict[str, LossFn] = {
    "dhel": dhel_published,
    "kcl": kcl_published,
    "align_uniform": align_uniform_published,
}


# --------------------------------------------------------------------------- Wasserstein


def sphere_cdf_grid(d: int, num_bins: int) -> np.ndarray:
    """CDF of ``u.v`` (u, v uniform on the sphere of R^d) at ``num_bins + 1`` points of [-1, 1].

    ``(1 + s) / 2 ~ Beta((d - 1)/2, (d - 1)/2)`` (docs/spec.md). Depends only on
    ``(d, num_bins)``, so callers compute it once and reuse it.
    """
    from scipy.special import betainc

    edges = np.linspace(-1.0, 1.0, num_bins + 1)
    a = (d - 1) / 2
    return betainc(a, a, (1.0 + edges) / 2.0)


def wasserstein_uniformity(x: Tensor, ref_cdf: Tensor) -> Tensor:
    """``W1 = int_{-1}^{1} |F_emp(s) - F_d(s)| ds`` over the pairs ``i < j``.

    The empirical CDF is read off the sorted pair similarities with
    ``searchsorted`` at the grid points of ``ref_cdf`` (from ``sphere_cdf_grid``)
    and integrated with the trapezoid rule: the eager sort-based computation a
    PyTorch user would write.
    """
    u = F.normalize(x, dim=1)
    m = u.shape[0]
    rows, cols = torch.triu_indices(m, m, offset=1, device=u.device)
    sims = torch.mm(u, u.t())[rows, cols]
    sims, _ = torch.sort(sims)
    grid = torch.linspace(-1.0, 1.0, ref_cdf.shape[0], dtype=torch.float64, device=u.device)
    emp = torch.searchsorted(sims.double(), grid, right=True).double() / sims.shape[0]
    return torch.trapezoid((emp - ref_cdf).abs(), grid)
