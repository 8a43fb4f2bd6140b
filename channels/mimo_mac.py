"""The R-MTLLMF uplink: a K-user MIMO multiple-access channel with LMMSE reception and a jammer.

K users (the clients of the batch) with ``nt`` antennas send to a base station with ``nr``
antennas; a jammer with ``jammer_antennas`` and power budget ``jammer_power_db`` adds noise
with covariance Q. With R = sigma^2 I + G Q G^H the interference-plus-noise covariance and
P = blockdiag(p_k I), p_k = P_k / nt, the joint LMMSE error covariance is
E = (P^-1 + H^H R^-1 H)^-1; following the paper, user k's received task vector is its true one
plus complex Gaussian noise with covariance E_k (its nt x nt block) per channel use, after the
payload is scaled to power p_k per stream.

Jammer strategies (``jammer``): ``none``; ``isotropic`` (Q = P_J / N_J I); ``worst_case``, the
paper's adversary minimising the sum rate sum_k log det(I + p_k H_k^H R^-1 H_k) over
{Q psd, tr Q <= P_J} (a convex problem: Gaussian mutual information is convex in the noise
covariance), solved here by projected gradient descent from the isotropic point; and
``strongest_user``: all power spread over the jammer directions that reach the column space of
the user with the largest channel gain ||H_k||_F. Defaults follow the authors' public code:
3 users, 8 transmit, 16 receive and 64 jammer antennas, jammer 30 dB, noise -3 dB, users 5 dB.
The solver acts on antenna-sized matrices; its cost does not grow with the payload size d.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt

from .base import (
    CHANNELS,
    Channel,
    ChannelParams,
    ChannelReport,
    ClientMeta,
    check_batch,
    db_to_linear,
    from_symbols,
    measured_report,
    to_symbols,
)

CDTYPE = torch.complex128


class MimoMacParams(ChannelParams):
    nt: PositiveInt = 8
    nr: PositiveInt = 16
    jammer_antennas: PositiveInt = 64
    jammer_power_db: float = 30.0
    noise_db: float = -3.0
    user_power_db: float = 5.0
    jammer: Literal["none", "isotropic", "worst_case", "strongest_user"] = "worst_case"
    solver_steps: PositiveInt = Field(300, description="projected-gradient iterations of the worst-case jammer")
    solver_step_size: float = Field(0.5, gt=0.0, description="step, relative to P_J / ||grad||")
    # lmmse: the paper's receiver, whose error never exceeds the signal power (it shrinks towards 0
    # under heavy jamming); zf: the unbiased zero-forcing (noise-whitened least-squares) receiver,
    # error (H^H R^-1 H)^-1, which grows without bound as the jammer gets stronger. zf needs
    # nr >= clients x nt.
    receiver: Literal["lmmse", "zf"] = "lmmse"


def _herm(a: torch.Tensor) -> torch.Tensor:
    return a.conj().transpose(-2, -1)


def project_power(q: torch.Tensor, budget: float) -> torch.Tensor:
    """Project a Hermitian matrix onto {Q psd, tr Q <= budget} (Frobenius norm)."""
    q = (q + _herm(q)) / 2
    lam, vec = torch.linalg.eigh(q)
    lam = lam.clamp_min(0)
    if lam.sum() > budget:
        # Euclidean projection of the eigenvalues onto the simplex {lam >= 0, sum = budget}.
        srt, _ = torch.sort(lam, descending=True)
        cssv = torch.cumsum(srt, 0) - budget
        idx = torch.arange(1, len(srt) + 1, dtype=srt.dtype)
        rho = int(torch.nonzero(srt - cssv / idx > 0).max())
        theta = cssv[rho] / (rho + 1)
        lam = (lam - theta).clamp_min(0)
    return (vec * lam.to(vec.dtype)) @ _herm(vec)


def sum_rate(h: list[torch.Tensor], p: list[float], r: torch.Tensor) -> torch.Tensor:
    """sum_k log det(I + p_k H_k^H R^-1 H_k), in nats."""
    r_inv = torch.linalg.inv(r)
    total = torch.zeros((), dtype=torch.float64)
    for hk, pk in zip(h, p):
        m = torch.eye(hk.shape[1], dtype=CDTYPE) + pk * _herm(hk) @ r_inv @ hk
        total = total + torch.linalg.slogdet(m).logabsdet
    return total


def noise_covariance(g: torch.Tensor, q: torch.Tensor, sigma2: float) -> torch.Tensor:
    return sigma2 * torch.eye(g.shape[0], dtype=CDTYPE) + g @ q @ _herm(g)


def worst_case_jammer(h: list[torch.Tensor], p: list[float], g: torch.Tensor, sigma2: float, budget: float,
                      steps: int = 300, step_size: float = 0.5) -> torch.Tensor:
    """Projected gradient descent on the sum rate over {Q psd, tr Q <= budget}; returns the best Q seen."""
    nj = g.shape[1]
    q = budget / nj * torch.eye(nj, dtype=CDTYPE)
    best_q, best = q, float(sum_rate(h, p, noise_covariance(g, q, sigma2)))
    for it in range(steps):
        r = noise_covariance(g, q, sigma2)
        r_inv = torch.linalg.inv(r)
        grad = torch.zeros_like(q)
        for hk, pk in zip(h, p):
            grad = grad + _herm(g) @ (torch.linalg.inv(r + pk * hk @ _herm(hk)) - r_inv) @ g
        norm = torch.linalg.matrix_norm(grad).real
        if norm == 0:
            break
        q = project_power(q - (step_size / math.sqrt(1 + it)) * budget / norm * grad, budget)
        value = float(sum_rate(h, p, noise_covariance(g, q, sigma2)))
        if value < best:
            best_q, best = q, value
    return best_q


def strongest_user_jammer(h: list[torch.Tensor], g: torch.Tensor, budget: float) -> tuple[torch.Tensor, int]:
    """Spread the budget over the jammer directions that reach the strongest user's column space."""
    target = int(torch.tensor([float(torch.linalg.matrix_norm(hk).real) for hk in h]).argmax())
    u, _, _ = torch.linalg.svd(h[target], full_matrices=False)
    proj = u @ _herm(u)
    _, vec = torch.linalg.eigh(_herm(g) @ proj @ g)
    k = h[target].shape[1]
    top = vec[:, -k:]
    return budget / k * top @ _herm(top), target


@CHANNELS.register("mimo_mac")
class MimoMacChannel(Channel):
    Params = MimoMacParams

    def draw(self, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Rayleigh channels: users' H_k (nr x nt) and the jammer's G (nr x nj), entries CN(0, 1)."""
        prm = self.params
        h = [torch.randn((prm.nr, prm.nt), dtype=CDTYPE, generator=self.generator) for _ in range(k)]
        g = torch.randn((prm.nr, prm.jammer_antennas), dtype=CDTYPE, generator=self.generator)
        return h, g

    def jammer_covariance(self, h: list[torch.Tensor], p: list[float], g: torch.Tensor, sigma2: float) -> torch.Tensor:
        prm = self.params
        nj, budget = prm.jammer_antennas, db_to_linear(prm.jammer_power_db)
        if prm.jammer == "none":
            return torch.zeros((nj, nj), dtype=CDTYPE)
        if prm.jammer == "isotropic":
            return budget / nj * torch.eye(nj, dtype=CDTYPE)
        if prm.jammer == "strongest_user":
            return strongest_user_jammer(h, g, budget)[0]
        return worst_case_jammer(h, p, g, sigma2, budget, prm.solver_steps, prm.solver_step_size)

    def error_covariances(self, h: list[torch.Tensor], p: list[float], r: torch.Tensor) -> list[torch.Tensor]:
        """Per-user blocks of the joint error covariance: LMMSE (P^-1 + H^H R^-1 H)^-1, or ZF
        (H^H R^-1 H)^-1."""
        nt, nr = self.params.nt, self.params.nr
        big_h = torch.cat(h, dim=1)
        fisher = _herm(big_h) @ torch.linalg.solve(r, big_h)
        if self.params.receiver == "zf":
            if len(h) * nt > nr:
                raise ValueError(f"channel.receiver 'zf' separates {len(h)} clients x {nt} streams with only "
                                 f"{nr} receive antennas; raise channel.nr to >= {len(h) * nt} or lower channel.nt")
            err = torch.linalg.inv(fisher)
        else:
            p_inv = torch.diag(torch.tensor([1 / pk for pk in p for _ in range(nt)], dtype=CDTYPE))
            err = torch.linalg.inv(p_inv + fisher)
        err = (err + _herm(err)) / 2
        return [err[i * nt:(i + 1) * nt, i * nt:(i + 1) * nt] for i in range(len(h))]

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        prm = self.params
        n, d = batch.shape
        sigma2 = db_to_linear(prm.noise_db)
        p = [db_to_linear(prm.user_power_db) * float(w) / prm.nt for w in meta.power()]
        h, g = self.draw(n)
        q = self.jammer_covariance(h, p, g, sigma2)
        r = noise_covariance(g, q, sigma2)
        errs = self.error_covariances(h, p, r)
        symbols = to_symbols(batch)
        m = symbols.shape[1]
        uses = -(-m // prm.nt)
        out = torch.empty_like(symbols)
        for k in range(n):
            row = symbols[k]
            if uses * prm.nt != m:
                row = torch.cat([row, row.new_zeros(uses * prm.nt - m)])
            power = float(torch.linalg.vector_norm(torch.view_as_real(symbols[k])) ** 2) / max(m, 1)
            alpha = math.sqrt(p[k] / power) if power > 0 else 1.0
            chol = torch.linalg.cholesky(errs[k] + 1e-12 * torch.eye(prm.nt, dtype=CDTYPE)).to(symbols.dtype)
            z = torch.randn((uses, prm.nt), dtype=symbols.dtype, generator=self.generator)
            noise = (z @ chol.T).reshape(-1)[:m]
            torch.add(symbols[k], noise, alpha=1 / alpha, out=out[k])
        received = from_symbols(out, d)
        rel_mse = torch.tensor([float(torch.diagonal(e).real.mean()) / pk for e, pk in zip(errs, p)])
        gains = torch.tensor([float(torch.linalg.matrix_norm(hk).real ** 2) for hk in h])
        return received, measured_report(
            batch, received, torch.full((n,), 32.0 * d), symbols=torch.full((n,), float(m)),
            sum_rate_nats=float(sum_rate(h, p, r)), jammer_power=float(torch.trace(q).real),
            relative_mse=rel_mse, channel_gain=gains,
        )
