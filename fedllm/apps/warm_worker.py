"""A warm worker per SuperNode: the process that trains, kept across rounds.

Flower 1.42 starts a fresh ClientApp process for every message, so every deployment round paid the
imports of torch, transformers and the workload and a model build before training: on loopback,
most of a tiny-bert round (``benchmarks/deployment_round.py``). The ClientApp (still a fresh,
torch-free process per message) now hands its message to a worker that the node's first message
starts and that stays, keeping its imports and models across rounds as Ray's workers do in
simulation.

One worker per SuperNode and app: its socket is named by the ClientApp's parent (the SuperNode's
SuperExec, which starts every ClientApp of that node) and by the import path (a new app version is
installed in another folder). The worker is in the node's process group, so stopping the SuperNode
stops it; it also leaves when that parent is gone, or after ``warm-worker-idle`` seconds (600)
without work. ``--node-config "warm-worker=false"`` trains inside each ClientApp process instead.
Messages cross as Flower's own protobuf records over a Unix socket in a directory only this user
can enter.

This module imports nothing heavy: the ClientApp imports it for every message.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from flwr.app import Context, RecordDict

log = logging.getLogger("fedllm")

IDLE_SECONDS = 600.0
START_SECONDS = 60.0  # for a new worker to listen (Python start and this module's imports)
_LENGTH = struct.Struct("!Q")
_OFF = {"false", "0", "no", "off"}


class WorkerGone(RuntimeError):
    """The worker closed the connection without a reply (killed, or out of memory)."""


# --- framing: a count, then that many length-prefixed blobs ---

def send_blobs(sock: socket.socket, blobs: list[bytes]) -> None:
    sock.sendall(_LENGTH.pack(len(blobs)) + b"".join(_LENGTH.pack(len(b)) + b for b in blobs))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 24))
        if not chunk:
            raise WorkerGone("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_blobs(sock: socket.socket) -> list[bytes]:
    (count,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    return [_recv_exact(sock, _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))[0]) for _ in range(count)]


def _records_to_bytes(records: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(records).SerializeToString()


def _context_to_bytes(context: Context) -> bytes:
    from flwr.common.serde import context_to_proto

    return context_to_proto(context).SerializeToString()


def _parse(data: bytes, proto_type: type, from_proto):
    proto = proto_type()
    proto.ParseFromString(data)
    return from_proto(proto)


def _records_from_bytes(data: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    return _parse(data, ProtoRecordDict, recorddict_from_proto)


def _context_from_bytes(data: bytes) -> Context:
    from flwr.common.serde import context_from_proto
    from flwr.proto.message_pb2 import Context as ProtoContext

    return _parse(data, ProtoContext, context_from_proto)


# --- the ClientApp's side ---

def wanted(context: Context, program: str | None = None) -> bool:
    """Only in Flower's process-per-message ClientApp (``flwr-clientapp``), unless the node says no.
    Simulation's Ray workers already keep their imports and models."""
    program = Path(program if program is not None else sys.argv[0]).name
    return program == "flwr-clientapp" and str(context.node_config.get("warm-worker", "true")).lower() not in _OFF


def socket_path(parent: int | None = None) -> Path:
    """Where this node's worker for this app listens: named by the parent process and the import path."""
    parent = os.getppid() if parent is None else parent
    key = hashlib.sha256(f"{parent}|{sys.executable}|{os.pathsep.join(sys.path)}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"fedllm-{os.getuid()}"
    if len(str(folder)) > 80:  # a Unix socket's path has at most 107 characters
        folder = Path("/tmp") / f"fedllm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder / f"{key}.sock"


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def ensure_worker(path: Path, idle: float, parent: int | None = None, wait: bool = True) -> socket.socket | None:
    """A connection to the worker at ``path``, starting the worker if none runs for it. ``wait=False``
    starts it and returns None at once (the node's first message, so the worker imports while the
    server evaluates round 0)."""
    sock = _connect(path)
    if sock is None:
        sock = _start_unless_running(path, idle, os.getppid() if parent is None else parent)
    if sock is None and wait:
        sock = _wait_for(path)
    if not wait and sock is not None:
        sock.close()
        return None
    return sock


def _start_unless_running(path: Path, idle: float, parent: int) -> socket.socket | None:
    """Start a worker for ``path`` unless one listens (its connection is returned) or is still starting.
    One start at a time: a lock beside the socket; the started worker's pid beside it, so a worker that
    does not listen yet is waited for, not started twice."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is None and not _starting(path):
            path.unlink(missing_ok=True)  # a dead worker's socket
            worker = start_worker(path, idle, parent)
            path.with_suffix(".pid").write_text(str(worker.pid))
        return sock


def _wait_for(path: Path) -> socket.socket | None:
    """The started worker's connection once it listens; None if it dies or takes over START_SECONDS."""
    deadline = time.monotonic() + START_SECONDS
    sock = _connect(path)
    while sock is None and time.monotonic() < deadline and _starting(path):
        time.sleep(0.05)
        sock = _connect(path)
    return sock


def _starting(path: Path) -> bool:
    """Whether the worker last started for ``path`` still runs (it may not listen yet)."""
    try:
        return _alive(int(path.with_suffix(".pid").read_text()))
    except (FileNotFoundError, ValueError):
        return False


def start_worker(path: Path, idle: float, parent: int) -> subprocess.Popen:
    """The worker imports the same fedllm as this process (its import path is passed on)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with open(path.with_suffix(".log"), "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedllm.apps.warm_worker", str(path), str(parent), str(idle)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                close_fds=True)


def idle_seconds(context: Context) -> float:
    return float(context.node_config.get("warm-worker-idle", IDLE_SECONDS))


def prestart(context: Context) -> None:
    """Start the node's worker without waiting for it (errors only logged: training falls back)."""
    if wanted(context):
        try:
            ensure_worker(socket_path(), idle_seconds(context), wait=False)
        except OSError as err:
            log.warning("could not start the warm worker (%s); this node trains in each ClientApp process", err)


def run_in_worker(kind: str, content: RecordDict, context: Context, program: str | None = None) -> RecordDict | None:
    """The reply of ``kind`` ("train" or "evaluate") computed by the node's worker, with
    ``context.state`` updated as the worker left it; None when there is no worker (not wanted, or it
    could not start, or it died before replying): the caller then does the work itself."""
    if not wanted(context, program):
        return None
    try:
        sock = ensure_worker(socket_path(), idle_seconds(context))
    except OSError as err:
        log.warning("warm worker unavailable (%s); training in this process", err)
        return None
    if sock is None:
        log.warning("the warm worker did not start within %.0f s; training in this process", START_SECONDS)
        return None
    return call(sock, kind, content, context)


def call(sock: socket.socket, kind: str, content: RecordDict, context: Context) -> RecordDict | None:
    with sock:
        try:
            send_blobs(sock, [kind.encode(), _records_to_bytes(content), _context_to_bytes(context)])
            status, *rest = recv_blobs(sock)
        except (OSError, WorkerGone) as err:
            log.warning("the warm worker went away during the %s message (%s); doing it in this process", kind, err)
            return None
    if status != b"ok":
        raise RuntimeError(f"client {kind} failed in the warm worker:\n{rest[0].decode()}")
    reply, state = _records_from_bytes(rest[0]), _records_from_bytes(rest[1])
    context.state.clear()  # in place: whoever holds the node's state object sees the worker's update
    context.state.update(state)
    return reply


# --- the worker's side ---

def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return sys.platform != "linux"  # no /proc: trust the signal check


def handle(conn: socket.socket) -> None:
    """One message: decode, do the round's work as the ClientApp would, reply with the result and the
    client state (or with the error's traceback: the worker stays up for the next message)."""
    from fedllm.apps.client_round import evaluate_round, train_round

    kind, content, context = recv_blobs(conn)
    try:
        ctx = _context_from_bytes(context)
        work = {b"train": train_round, b"evaluate": evaluate_round}[kind]
        reply = work(_records_from_bytes(content), ctx)
        send_blobs(conn, [b"ok", _records_to_bytes(reply), _records_to_bytes(ctx.state)])
    except Exception:  # noqa: BLE001 - reported to the ClientApp, which fails the message as Flower expects
        send_blobs(conn, [b"error", traceback.format_exc().encode()])


def serve(path: Path, parent: int, idle: float) -> None:
    """Listen at ``path`` until ``parent`` is gone or ``idle`` seconds pass without a message."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError:
        return  # another worker listens there
    inode = path.stat().st_ino
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.settimeout(1.0)
    import fedllm.apps.client_round  # noqa: F401 - the heavy imports, while a first ClientApp may already wait

    last = time.monotonic()
    try:
        while _alive(parent) and time.monotonic() - last < idle:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            with conn:
                try:
                    handle(conn)
                except (OSError, WorkerGone) as err:  # the ClientApp went away (its message timed out)
                    print(f"warm worker: a message was dropped: {err}", file=sys.stderr, flush=True)
            last = time.monotonic()
    finally:
        listener.close()
        try:
            if path.stat().st_ino == inode:
                path.unlink()
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
