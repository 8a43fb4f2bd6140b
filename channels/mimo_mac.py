"""The R-MTLLMF uplink: a K-user MIMO multiple-access channel with LMMSE reception and a jammer.

K users (the clients of the batch) with ``nt`` antennas send to a base station with ``nr``
antennas; a jammer with ``jammer_antennas`` and power budget ``jammer_power_db`` adds noise
with covariance Q. With R = sigma^2 I + G Q G^H the interference-plus-noise covariance and
P = blockdiag(p_k I), p_k = P_k / nt, the joint LMMSE error covariance is
E = (P^-1 + H^H R^-1 H)^-1; following the paper, user k's received task vector is its true one
plus complex Gaussian noise with covariance E_k (its nt x nt block) per channel use, after the
payload is scaled to power p_k per stream. With ``receiver: zf`` the error is the zero-forcing
one, (H^H R^-1 H)^-1, blockwise.

Jammer strategies (``jammer``): ``none``; ``isotropic`` (Q = P_J / N_J I); ``strongest_user``: all
power spread over the jammer directions that reach the column space of the user with the largest
channel gain ||H_k||_F; and ``worst_case``: the adversary of Djuhera et al. (arXiv 2411.18220,
Sec. III), who picks Q in {Q psd, tr Q <= P_J} to minimise the uplink sum rate. The rate that counts
is the one the simulated receiver achieves, since the payloads get exactly its error: user k's
estimate is x_k plus noise of covariance E_k, so its rate is log det(p_k E_k^-1) with the
(biased) LMMSE estimate, i.e. I(x_k; y) with the other users as noise, and log det(I + p_k
(E_k^zf)^-1) after zero-forcing (:func:`receiver_sum_rate`). Single-user rates that ignore the
other users (:func:`sum_rate`) are kept only as the capacity-style report of the round. The
problem is not convex in general (a rate with interference is a difference of concave functions of
Q); the solver (:func:`worst_case_jammer`) reduces it to the noise the receiver can see and runs
scipy's L-BFGS from isotropic noise, stopping at gradient norm ``solver_tol`` or after
``solver_steps`` iterations; the round's channel record carries the iterations used and the
projected-gradient stationarity measure of the result (:func:`stationarity`, 0 at a first-order
stationary point). An independent optimiser (L-BFGS on the full 64 x 64 covariance from random
starts) finds no lower rate (tests/test_channels.py). Defaults follow the authors' public code: 3 users, 8 transmit, 16 receive and 64
jammer antennas, jammer 30 dB, noise -3 dB, users 5 dB. The solver acts on antenna-sized
matrices; its cost does not grow with the payload size d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    solver_steps: PositiveInt = Field(2000, description="at most this many L-BFGS iterations of the worst-case jammer")
    solver_tol: float = Field(1e-12, gt=0.0, description="stop when the (scaled) gradient is below this")
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


def error_blocks(h: list[torch.Tensor], p: list[float], r: torch.Tensor, receiver: str) -> list[torch.Tensor]:
    """Per-user blocks of the joint error covariance: LMMSE (P^-1 + H^H R^-1 H)^-1, or ZF (H^H R^-1 H)^-1."""
    nt = h[0].shape[1]
    big_h = torch.cat(h, dim=1)
    fisher = _herm(big_h) @ torch.linalg.solve(r, big_h)
    if receiver == "zf":
        err = torch.linalg.inv(fisher)
    else:
        p_inv = torch.diag(torch.tensor([1 / pk for pk in p for _ in range(nt)], dtype=CDTYPE))
        err = torch.linalg.inv(p_inv + fisher)
    err = (err + _herm(err)) / 2
    return [err[i * nt:(i + 1) * nt, i * nt:(i + 1) * nt] for i in range(len(h))]


def receiver_sum_rate(h: list[torch.Tensor], p: list[float], r: torch.Tensor, receiver: str) -> torch.Tensor:
    """The sum of the rates the receiver achieves per user (nats): log det(p_k E_k^-1) for LMMSE,
    log det(I + p_k E_k^-1) for ZF, from the error blocks E_k."""
    total = torch.zeros((), dtype=torch.float64)
    for e, pk in zip(error_blocks(h, p, r, receiver), p):
        eye = torch.eye(e.shape[0], dtype=CDTYPE)
        inner = pk * torch.linalg.inv(e) + (eye if receiver == "zf" else 0)
        total = total + torch.linalg.slogdet(inner).logabsdet
    return total


@dataclass
class JammerSolution:
    q: torch.Tensor
    objective: float  # the receiver's sum rate (nats) under q
    pg_norm: float  # the projected-gradient stationarity measure at q (0: first-order stationary)
    iterations: int


def worst_case_jammer(h: list[torch.Tensor], p: list[float], g: torch.Tensor, sigma2: float, budget: float,
                      receiver: str = "lmmse", steps: int = 2000, tol: float = 1e-12) -> JammerSolution:
    """The noise covariance that minimises the receiver's sum rate over {Q psd, tr Q <= budget}.

    Only R = sigma^2 I + G Q G^H reaches the receiver. When the jammer has at least as many antennas
    as the receiver (G of full row rank), every psd S = G Q G^H is reachable and costs at least
    tr(S (G G^H)^-1), reached by Q = G^+ S G^+^H; with T = W^1/2 S W^1/2, W = (G G^H)^-1, the
    problem becomes one over nr x nr matrices with tr T <= budget, whatever the number of jammer
    antennas (fewer antennas: T is Q itself). More noise never raises a rate, so the optimum spends
    the whole budget: T = budget C C^H / tr(C C^H), minimised over C by scipy's L-BFGS (objective
    scaled by its isotropic value, gradients by autograd), from C = I (isotropic noise)."""
    import numpy as np
    from scipy.optimize import minimize

    nr, nj = g.shape
    if nj >= nr:
        w = torch.linalg.inv(g @ _herm(g))
        lam, vec = torch.linalg.eigh(w)
        lift = (vec * lam.rsqrt().to(vec.dtype)) @ _herm(vec)  # W^-1/2: T -> S = W^-1/2 T W^-1/2 at the receiver
        to_q = _herm(g) @ w @ lift  # G^+ W^-1/2: T -> Q = to_q T to_q^H, tr Q = tr T
    else:
        lift, to_q = g, torch.eye(nj, dtype=CDTYPE)  # Q itself, seen through G
    m = lift.shape[1]

    def rate(t: torch.Tensor) -> torch.Tensor:
        return receiver_sum_rate(h, p, sigma2 * torch.eye(nr, dtype=CDTYPE) + lift @ t @ _herm(lift), receiver)

    def from_c(c: torch.Tensor) -> torch.Tensor:
        cc = c @ _herm(c)
        return budget * cc / torch.trace(cc).real

    isotropic = budget / m * torch.eye(m, dtype=CDTYPE)
    scale = max(abs(rate(isotropic).item()), 1e-300)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        c = torch.tensor(x[: m * m].reshape(m, m) + 1j * x[m * m:].reshape(m, m), dtype=CDTYPE, requires_grad=True)
        value = rate(from_c(c)) / scale
        (grad,) = torch.autograd.grad(value, c)
        return value.item(), np.concatenate([2 * grad.real.numpy().ravel(), 2 * grad.imag.numpy().ravel()])

    start = np.concatenate([np.eye(m).ravel(), np.zeros(m * m)])
    result = minimize(objective, start, jac=True, method="L-BFGS-B",
                      options={"maxiter": steps, "gtol": tol, "ftol": 1e-15})
    c = torch.tensor(result.x[: m * m].reshape(m, m) + 1j * result.x[m * m:].reshape(m, m), dtype=CDTYPE)
    t = from_c(c)
    return JammerSolution(to_q @ t @ _herm(to_q), rate(t).item(), stationarity(rate, t, budget), int(result.nit))


def stationarity(f, x: torch.Tensor, budget: float) -> float:
    """||X - proj(X - s grad f)||_F / budget with s = budget / ||grad f||_F: zero exactly at first-order
    stationary points of f on {X psd, tr X <= budget}, whatever the gradient's scale."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    grad = (grad + _herm(grad)) / 2
    step = budget / max(float(torch.linalg.matrix_norm(grad).real), 1e-300)
    return float(torch.linalg.matrix_norm(x.detach() - project_power(x.detach() - step * grad, budget)).real) / budget


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

    def jammer_covariance(self, h: list[torch.Tensor], p: list[float], g: torch.Tensor, sigma2: float
                          ) -> tuple[torch.Tensor, dict[str, float]]:
        """Q and what to report of how it was chosen."""
        prm = self.params
        nj, budget = prm.jammer_antennas, db_to_linear(prm.jammer_power_db)
        if prm.jammer == "none":
            return torch.zeros((nj, nj), dtype=CDTYPE), {}
        if prm.jammer == "isotropic":
            return budget / nj * torch.eye(nj, dtype=CDTYPE), {}
        if prm.jammer == "strongest_user":
            return strongest_user_jammer(h, g, budget)[0], {}
        solved = worst_case_jammer(h, p, g, sigma2, budget, prm.receiver, prm.solver_steps, prm.solver_tol)
        return solved.q, {"jammer_pg_norm": solved.pg_norm, "jammer_iterations": float(solved.iterations)}

    def error_covariances(self, h: list[torch.Tensor], p: list[float], r: torch.Tensor) -> list[torch.Tensor]:
        nt, nr = self.params.nt, self.params.nr
        if self.params.receiver == "zf" and len(h) * nt > nr:
            raise ValueError(f"channel.receiver 'zf' separates {len(h)} clients x {nt} streams with only "
                             f"{nr} receive antennas; raise channel.nr to >= {len(h) * nt} or lower channel.nt")
        return error_blocks(h, p, r, self.params.receiver)

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        prm = self.params
        n, d = batch.shape
        sigma2 = db_to_linear(prm.noise_db)
        p = [db_to_linear(prm.user_power_db) * float(w) / prm.nt for w in meta.power()]
        h, g = self.draw(n)
        q, solver = self.jammer_covariance(h, p, g, sigma2)
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
            sum_rate_nats=float(receiver_sum_rate(h, p, r, prm.receiver)),
            single_user_rate_nats=float(sum_rate(h, p, r)), jammer_power=float(torch.trace(q).real), **solver,
            relative_mse=rel_mse, channel_gain=gains,
        )
