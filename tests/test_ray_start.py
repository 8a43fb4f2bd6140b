"""``fedllm run`` starts Ray while it imports (fedllm/apps/ray_start.py): with the arguments Flower's own
simulation would give ``ray.init`` (Flower 1.42's run_simulation and RayBackend as the oracle), used by
Flower instead of a second start, and shut down however the run ends."""

from __future__ import annotations

import copy
import importlib
import json
import threading

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedllm.apps.ray_start import EarlyRay, backend_config, ray_init_kwargs
from fedllm.config import load_config
from fedllm.core.errors import DataError


def _flowers_ray_init_kwargs(monkeypatch, config: dict) -> dict:
    """What Flower passes to ray.init for ``config``: its run_simulation builds the backend config (its
    last step, the simulation loop, is replaced to catch it) and its RayBackend turns that into
    ray.init's arguments (ray.init replaced)."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    module = importlib.import_module("flwr.simulation.run_simulation")
    seen: dict = {}
    monkeypatch.setattr(module, "_main_loop", lambda *args, **kwargs: seen.setdefault("stream", args[2]))
    module.run_simulation(server_app=ServerApp(), client_app=ClientApp(), num_supernodes=1,
                          backend_config=copy.deepcopy(config))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.setdefault("init", kwargs))
    RayBackend(json.loads(seen["stream"]))
    return seen["init"]


@pytest.mark.parametrize("cpus, gpus, address, pythonpath", [
    (1.0, 0.0, None, None),  # fedllm run's default
    (2.0, 0.5, None, "/opt/extra"),  # GPUs shared, and a PYTHONPATH of the user's
    (1.0, 0.0, "127.0.0.1:6379", None),  # joining a Ray cluster
])
def test_the_early_start_gives_ray_the_arguments_flower_would(monkeypatch, cpus, gpus, address, pythonpath):
    if pythonpath:
        monkeypatch.setenv("PYTHONPATH", pythonpath)
    else:
        monkeypatch.delenv("PYTHONPATH", raising=False)
    config = backend_config(cpus, gpus, address)
    ours = ray_init_kwargs(config)
    flowers = _flowers_ray_init_kwargs(monkeypatch, config)
    assert ours == flowers
    assert ("address" in ours) == bool(address) and ours["include_dashboard"] is False


def _spy_on_ray_init(monkeypatch) -> list[str]:
    """The name of the thread of every ray.init call."""
    import ray

    real, callers = ray.init, []

    def spy(*args, **kwargs):
        callers.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(ray, "init", spy)
    return callers


@pytest.mark.slow
def test_flower_runs_on_the_early_ray_and_it_is_gone_after_the_run(monkeypatch, tiny_overrides, tmp_path):
    import ray

    from fedllm.apps.simulation import simulate
    from fedllm.results.writer import read_metrics

    callers = _spy_on_ray_init(monkeypatch)
    cfg = load_config(None, [*tiny_overrides, "rounds=1", "client.max_steps=2", f"output.dir={tmp_path}"])
    early = EarlyRay(backend_config(1.0, 0.0, None))
    run_dir = simulate(cfg, 2, early_ray=early, echo=lambda line: None)
    assert callers == ["fedllm-ray-start"]  # Flower found Ray running and did not start another
    assert read_metrics(run_dir)[-1]["clients_used"] == 2  # the workers imported fedllm: PYTHONPATH reached them
    assert not early._thread.is_alive() and not ray.is_initialized()


@pytest.mark.slow
def test_a_run_that_fails_before_the_simulation_leaves_no_ray_behind(monkeypatch, tiny_overrides, tmp_path):
    import ray

    from fedllm.apps.simulation import simulate

    callers = _spy_on_ray_init(monkeypatch)
    cfg = load_config(None, [*tiny_overrides, f"output.dir={tmp_path}"])
    early = EarlyRay(backend_config(1.0, 0.0, None))
    with pytest.raises(DataError, match="cannot fill 100000 clients"):
        simulate(cfg, 100_000, early_ray=early, echo=lambda line: None)
    # simulate returned only once the thread had Ray up and shut it down again: none is left for a next run
    assert callers == ["fedllm-ray-start"]
    assert not early._thread.is_alive() and not ray.is_initialized()
    assert not any(tmp_path.iterdir())  # and no results folder was made
