"""Which clients train each round, chosen over run-stable identities.

Flower's node ids are drawn afresh for every run, so a seeded sample of node ids is not the same
clients twice. Every node is asked once who it is (a QUERY message: its data partition, ``p3``;
a device with its own data answers nothing and is known by its node id, ``n<id>``), and the
sampler draws from the identities in a fixed order: the same seed samples the same partitions in
every run, and a resumed run continues the sampler's checkpointed state.

- ``fixed``: ``max(min_clients, round(fraction_train x N))`` clients without replacement (FedAvg's).
- ``poisson``: each client independently with probability ``fraction_train`` (DP-FedAvg's, McMahan
  et al. 2018: what the privacy accountant's sub-sampling amplification assumes).
"""

from __future__ import annotations

import random
import re

from fedllm.config import StrategySection


def identity_order(identity: str) -> tuple[int, int]:
    """Partitions first, by number; then devices known by node id."""
    match = re.fullmatch(r"([pn])(\d+)", identity)
    if not match:
        return (2, 0)
    return (0 if match.group(1) == "p" else 1, int(match.group(2)))


def sample_clients(strategy: StrategySection, identities: dict[int, str], rng: random.Random) -> list[int]:
    """The node ids that train this round (in identity order)."""
    nodes = sorted(identities, key=lambda n: identity_order(identities[n]))
    if strategy.sampling == "poisson":
        return [n for n in nodes if rng.random() < strategy.fraction_train]
    k = max(strategy.min_clients, round(strategy.fraction_train * len(nodes)))
    chosen = set(rng.sample(nodes, min(k, len(nodes))))
    return [n for n in nodes if n in chosen]
