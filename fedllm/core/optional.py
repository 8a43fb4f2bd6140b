"""Optional packages: a missing one is a config error at load time, naming the install."""

from __future__ import annotations

import importlib.util

# tracking kind -> (import name, install command)
TRACKING_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                     "mlflow": ("mlflow", "pip install -e '.[mlflow]'")}


def check_installed(kind: str) -> None:
    """Fail at config time, naming the install, rather than after the first round."""
    if kind == "none":
        return
    package, install = TRACKING_PACKAGES[kind]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"output.tracking: {kind!r} needs the {package} package: {install}, "
                         "or set output.tracking: none")
