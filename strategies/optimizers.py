"""Server optimisers: the fused delta of a round is a pseudo-gradient the server steps on
(Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The fusion rule fuses the received deltas into Delta_t; the optimiser turns it into the step the
server applies (``global += server_lr * step``, server_lr 1 by default); with ``none`` the step is
Delta_t itself (FedAvg). The formulas are those of Flower's own strategies (flwr.serverapp.strategy
1.42), which the tests use as oracles:

- ``fedavgm``: m_1 = Delta_1, m_t = momentum m_{t-1} + Delta_t; step = lr m_t.
- ``fedadagrad``: v_t = v_{t-1} + Delta_t^2; step = eta Delta_t / (sqrt(v_t) + tau).
- ``fedadam``: m_t = b1 m + (1 - b1) Delta_t, v_t = b2 v + (1 - b2) Delta_t^2;
  step = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m_t / (sqrt(v_t) + tau), t the round (as Flower).
- ``fedyogi``: m_t as Adam, v_t = v - (1 - b2) Delta_t^2 sign(v - Delta_t^2);
  step = eta m_t / (sqrt(v_t) + tau).

The optimiser's state (momenta, second moments) is part of the server checkpoint, so a resumed run
continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedllm.core.registry import Registry


class OptimizerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerOptimizer:
    """Turns the round's fused delta into the step the server takes; keeps its own state."""

    Params: ClassVar[type[OptimizerParams]] = OptimizerParams

    def __init__(self, params: OptimizerParams | None = None) -> None:
        self.params = params or self.Params()
        self.state: dict[str, torch.Tensor] = {}

    def step(self, delta: torch.Tensor, server_round: int) -> torch.Tensor:
        return delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    def _moment(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.state.get(name, torch.zeros_like(like))


SERVER_OPTIMIZERS: Registry[type[ServerOptimizer]] = Registry("server optimizer")
SERVER_OPTIMIZERS.register("none")(ServerOptimizer)


class FedAvgMParams(OptimizerParams):
    lr: float = Field(1.0, gt=0.0, description="server learning rate")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="server momentum (Flower's default 0: FedAvg)")


@SERVER_OPTIMIZERS.register("fedavgm")
class FedAvgM(ServerOptimizer):
    Params = FedAvgMParams

    def step(self, delta: torch.Tensor, server_round: int) -> torch.Tensor:
        p = self.params
        if p.momentum > 0:
            m = delta.clone() if "m" not in self.state else p.momentum * self.state["m"] + delta
            self.state["m"] = m
            delta = m
        return p.lr * delta


class FedAdagradParams(OptimizerParams):
    eta: float = Field(0.1, gt=0.0, description="server learning rate")
    tau: float = Field(1e-3, gt=0.0, description="adaptivity: added to sqrt(v)")


@SERVER_OPTIMIZERS.register("fedadagrad")
class FedAdagrad(ServerOptimizer):
    Params = FedAdagradParams

    def step(self, delta: torch.Tensor, server_round: int) -> torch.Tensor:
        v = self._moment("v", delta) + delta.pow(2)
        self.state["v"] = v
        return self.params.eta * delta / (v.sqrt() + self.params.tau)


class AdamParams(OptimizerParams):
    eta: float = Field(0.1, gt=0.0, description="server learning rate")
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    tau: float = Field(1e-3, gt=0.0, description="adaptivity: added to sqrt(v)")


@SERVER_OPTIMIZERS.register("fedadam")
class FedAdam(ServerOptimizer):
    Params = AdamParams

    def step(self, delta: torch.Tensor, server_round: int) -> torch.Tensor:
        p = self.params
        m = p.beta_1 * self._moment("m", delta) + (1 - p.beta_1) * delta
        v = p.beta_2 * self._moment("v", delta) + (1 - p.beta_2) * delta.pow(2)
        self.state.update(m=m, v=v)
        eta = p.eta * math.sqrt(1 - p.beta_2 ** (server_round + 1.0)) / (1 - p.beta_1 ** (server_round + 1.0))
        return eta * m / (v.sqrt() + p.tau)


class YogiParams(AdamParams):
    eta: float = Field(0.01, gt=0.0, description="server learning rate")


@SERVER_OPTIMIZERS.register("fedyogi")
class FedYogi(ServerOptimizer):
    Params = YogiParams

    def step(self, delta: torch.Tensor, server_round: int) -> torch.Tensor:
        p = self.params
        m = p.beta_1 * self._moment("m", delta) + (1 - p.beta_1) * delta
        v = self._moment("v", delta)
        sq = delta.pow(2)
        v = v - (1 - p.beta_2) * sq * torch.sign(v - sq)
        self.state.update(m=m, v=v)
        return p.eta * m / (v.sqrt() + p.tau)


def build_optimizer(name: str, params: dict[str, Any]) -> ServerOptimizer:
    return SERVER_OPTIMIZERS.get(name)(SERVER_OPTIMIZERS.validate(name, params, "strategy.optimizer"))
