"""Make SuperNode key pairs for Flower's SuperNode authentication (ECDSA P-384, OpenSSH format).

    python deploy/make_node_keys.py [OUT_DIR] [COUNT]

OUT_DIR (default: keys/) receives node-1 ... node-COUNT (private keys: each stays on its device,
passed to ``flower-supernode --auth-supernode-private-key``) and node-1.pub ... (public keys: register
each with ``flwr supernode register keys/node-1.pub <superlink>`` while the SuperLink runs with
``--enable-supernode-auth``; only registered SuperNodes may connect). Uses ``cryptography``, which
Flower already depends on; ``ssh-keygen -t ecdsa -b 384`` makes the same kind of pair.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def make_keys(out: Path, count: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(1, count + 1):
        key = ec.generate_private_key(ec.SECP384R1())
        private = out / f"node-{i}"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        private.chmod(0o600)
        (out / f"node-{i}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                          serialization.PublicFormat.OpenSSH))
        made.append(private)
    return made


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("keys")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    make_keys(out, count)
    print(f"{count} SuperNode key pairs in {out}: node-i (private, stays on device i), node-i.pub (register it)")
