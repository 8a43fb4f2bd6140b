"""A fingerprint of the fedllm code a process runs, so a server can tell when a client runs other code.

Under ``flwr run`` every process should import the submitted app; a stale module that happens to be
importable first (a SuperLink started from another checkout, an old install on a device) would
train with other code and no error. The server sends its fingerprint with every round; a client
whose own differs refuses the round with a message naming both places.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path


def package_dirs() -> list[Path]:
    import fedllm
    import fedllm.channels
    import fedllm.clients
    import fedllm.strategies

    return [Path(m.__file__).resolve().parent for m in (fedllm, fedllm.channels, fedllm.strategies, fedllm.clients)]


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of every Python source file of fedllm and its plugins (names and contents)."""
    digest = hashlib.sha256()
    for root in package_dirs():
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{root.name}/{path.relative_to(root).as_posix()}".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def code_location() -> str:
    return str(package_dirs()[0])
