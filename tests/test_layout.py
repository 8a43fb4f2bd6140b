"""The package's shape: layers import only downwards, plugins only fedllm's core, and the plugin
packages are installed inside fedllm, so an unrelated `channels` package cannot shadow them."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("channels", "strategies", "clients")
# lowest first; a module may import its own package and any lower layer
LAYERS = {"fedllm.core": 0, "fedllm.channels": 1, "fedllm.strategies": 1, "fedllm.clients": 1, "fedllm.config": 2,
          "fedllm.workloads": 3, "fedllm.fusion": 4, "fedllm.results": 5, "fedllm.apps": 6, "fedllm.api": 7,
          "fedllm": 8}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its import name."""
    found = {}
    for folder, package in [(ROOT / "fedllm", "fedllm"), *((ROOT / p, f"fedllm.{p}") for p in PLUGINS)]:
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """fedllm modules imported anywhere in the file (lazy imports in functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
    return {m for m in out if m == "fedllm" or m.startswith("fedllm.") or m.split(".")[0] in PLUGINS}


def package_of(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def test_layers_import_only_downwards_and_plugins_only_the_core():
    problems = []
    for name, path in modules().items():
        own = package_of(name)
        for imported in imports_of(name, path):
            if imported == "fedllm":  # the package root imports nothing eagerly (its public names are lazy)
                continue
            if imported.split(".")[0] in PLUGINS:
                problems.append(f"{name} imports the top-level name {imported!r}; use fedllm.{imported}")
                continue
            target = package_of(imported)
            if own.split(".")[1:2] and own.split(".")[1] in PLUGINS and target not in (own, "fedllm.core"):
                problems.append(f"plugin {name} imports {imported} (plugins may import only fedllm.core)")
            elif target != own and LAYERS[target] >= LAYERS[own]:
                problems.append(f"{name} ({own}) imports {imported} ({target}), a layer that is not below it")
    assert not problems, "\n".join(problems)


def test_the_import_check_sees_a_violation():
    """The check above would catch a plugin importing the config (the cycle this layout removed)."""
    bad = ROOT / "channels" / "_probe_for_test.py"
    bad.write_text("from fedllm.config import ExperimentConfig\n")
    try:
        with pytest.raises(AssertionError, match="plugin fedllm.channels._probe_for_test imports fedllm.config"):
            test_layers_import_only_downwards_and_plugins_only_the_core()
    finally:
        bad.unlink()


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    on_disk = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert declared == on_disk
    assert config["package-dir"] == {f"fedllm.{p}": p for p in PLUGINS}


def test_an_unrelated_channels_package_does_not_shadow_fedllms(tmp_path):
    """Django Channels installs a top-level `channels`; with it first on the path, both work."""
    fake = tmp_path / "channels"
    fake.mkdir()
    (fake / "__init__.py").write_text("NAME = 'django-channels'\n")
    code = ("import channels, fedllm.channels; assert channels.NAME == 'django-channels'; "
            "assert 'awgn' in fedllm.channels.CHANNELS.names(); "
            "from fedllm.config import load_config; load_config(None, 'channel.kind=awgn'); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
