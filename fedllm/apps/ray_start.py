"""Ray, started while a ``fedllm run`` is still importing torch and building its model.

A run's first ~10 s are imports on one core (torch, transformers, PEFT, Flower); then Flower starts
Ray, whose GCS, raylet and agents take another ~5-7 s, mostly in processes of their own. Started
in a background thread at the command's start, Ray comes up on the other core meanwhile. Flower's
Ray backend starts Ray only when it is not running, so the early start must pass exactly the
arguments Flower would (``ray_init_kwargs``; tests/test_ray_start.py checks them against Flower's own
``RayBackend.init_ray``).

The thread that starts Ray stays alive until the run ends: Ray has the kernel kill its GCS and raylet
when the *thread* that started them exits (``PR_SET_PDEATHSIG`` is per thread), which a short-lived
thread would do at once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("fedllm")

# Ray starts one idle Python worker per core when it comes up ("prestart"); Flower runs its clients
# in actors, which Ray gives workers of their own, so those workers only cost ~0.7 s of CPU each.
NO_PRESTART = {"RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}


def without_prestarted_workers() -> None:
    """Ray reads these when it starts; a value the user set stays."""
    for key, value in NO_PRESTART.items():
        os.environ.setdefault(key, value)


def backend_config(cpus_per_client: float, gpus_per_client: float, ray_address: str | None) -> dict:
    """Flower's Ray backend: client resources, and either this machine's cores or a cluster to join."""
    resources = {"num_cpus": cpus_per_client, **({"num_gpus": gpus_per_client} if gpus_per_client else {})}
    init = {"address": ray_address} if ray_address else {"num_cpus": os.cpu_count() or 1}
    return {"client_resources": resources, "init_args": init}


def ray_init_kwargs(backend_config: dict) -> dict:
    """What Flower 1.42 passes to ``ray.init`` for ``backend_config`` in ``run_simulation``: its init
    args with Flower's defaults (logging level, log to driver, no dashboard) and the driver's
    ``sys.path`` as the workers' PYTHONPATH (taken after importing Ray, which adds its own folder to it,
    as it is when Flower takes it)."""
    import ray  # noqa: F401
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    kwargs = dict(backend_config.get("init_args", {}))
    kwargs.setdefault("logging_level", DEFAULT_SIMULATION_CONFIG.init_args_logging_level)
    kwargs.setdefault("log_to_driver", DEFAULT_SIMULATION_CONFIG.init_args_log_to_driver)
    kwargs.setdefault("include_dashboard", False)
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    return {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}, **kwargs}


class _NotTheSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SIGTERM handler is not set")


class EarlyRay:
    """Ray being started in a background thread; ``wait()`` before Flower's simulation starts,
    ``release()`` when it has ended."""

    def __init__(self, backend_config: dict) -> None:
        self._config = backend_config
        self._up = threading.Event()
        self._done = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, name="fedllm-ray-start", daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        try:
            import ray

            without_prestarted_workers()
            # started off the main thread on purpose: Ray's warning that it therefore sets no SIGTERM
            # handler (release() shuts Ray down) would be a stray line in the command's output
            logging.getLogger("ray._private.worker").addFilter(_NotTheSigtermWarning())
            kwargs = ray_init_kwargs(self._config)
            os.environ["PYTHONPATH"] = kwargs["runtime_env"]["env_vars"]["PYTHONPATH"]  # as Flower does
            ray.init(**kwargs)
        except BaseException as err:  # noqa: BLE001 - Flower then starts Ray itself, and reports its error
            self.error = err
            log.debug("fedllm: starting Ray early failed (%s); Flower starts it", err)
            return
        finally:
            self._up.set()
        self._done.wait()
        if ray.is_initialized():  # the run failed before Flower took Ray over
            ray.shutdown()

    def wait(self) -> bool:
        """Block until Ray is up (or failed to start: then Flower starts it); True if it is up."""
        self._up.wait()
        return self.error is None

    def release(self) -> None:
        """The run is over: if Flower has not shut Ray down (the run failed before the simulation), the
        thread does, and this waits for it, so that no Ray is left for the next run in this process to
        find (and lose mid-run)."""
        self._done.set()
        self._thread.join()
