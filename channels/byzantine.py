"""Colluding Byzantine clients that see every honest update: attacks built to pass robust rules.

Attacks such as "a little is enough" need the honest clients' updates, which only an omniscient
adversary has; the simulation gives it that view where every update meets: the uplink. Put it first
in a chain (``channel: {kind: compose, chain: [{kind: byzantine, attack: alie, fraction: 0.2}, {kind: awgn}]}``)
or use it alone; the attackers are the clients named in ``clients`` (client ids such as ``p3``) or a
seeded ``fraction`` of the round's clients, and their own updates are replaced.

- ``alie`` ("a little is enough", Baruch et al. 2019): every attacker sends mu - z sigma, the honest
  updates' coordinate-wise mean minus z standard deviations, with z from the normal quantile of
  (n - s) / n, s = floor(n / 2 + 1) - f (their choice, so the attack stays inside the spread that
  median and trimmed mean accept), or a given ``z``.
- ``ipm`` (inner-product manipulation, Xie et al. 2020): every attacker sends -epsilon mu.
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Literal

import torch
from pydantic import Field

from .base import CHANNELS, Channel, ChannelParams, ChannelReport, ClientMeta, check_batch, measured_report


class ByzantineParams(ChannelParams):
    attack: Literal["alie", "ipm"] = "alie"
    clients: list[str] = Field(default_factory=list, description="client ids of the attackers, e.g. [p0, p3]")
    fraction: float = Field(0.2, ge=0.0, lt=1.0, description="or this fraction of the round's clients, seeded")
    z: float | None = Field(None, description="alie: standard deviations below the mean (default: Baruch et al.'s)")
    epsilon: float = Field(0.5, gt=0.0, description="ipm: the attackers send -epsilon x the honest mean")



def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max: the largest shift that still leaves the attackers among the majority."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(max(1e-6, min(1 - 1e-6, (n - s) / n)))


@CHANNELS.register("byzantine")
class ByzantineUplink(Channel):
    Params = ByzantineParams

    def attackers(self, meta: ClientMeta) -> list[int]:
        prm = self.params
        if prm.clients:
            return [i for i, cid in enumerate(meta.ids) if cid in prm.clients]
        count = round(prm.fraction * len(meta.ids))
        return sorted(random.Random(f"byzantine-{self.seed}").sample(range(len(meta.ids)), count))

    def transmit(self, batch: torch.Tensor, meta: ClientMeta) -> tuple[torch.Tensor, ChannelReport]:
        check_batch(batch)
        n, d = batch.shape
        bad = self.attackers(meta)
        honest = [i for i in range(n) if i not in bad]
        out = batch.clone()
        if bad and honest:
            mean = batch[honest].mean(dim=0)
            if self.params.attack == "alie":
                z = self.params.z if self.params.z is not None else alie_z(n, len(bad))
                std = batch[honest].std(dim=0, unbiased=False) if len(honest) > 1 else torch.zeros(d)
                out[bad] = mean - z * std
            else:
                out[bad] = -self.params.epsilon * mean
        return out, measured_report(batch, out, torch.full((n,), 32.0 * d), attackers=float(len(bad)))
