"""Atomic, checksummed checkpoints, and recovery of the newest one that is intact.

File layout (all integers little-endian)::

    header   16 bytes   b"DINRCKPT" | format version u32 | reserved u32 (0)
    payload   L bytes   torch.save(state) (zip format)
    trailer  48 bytes   L u64 | sha256(payload) 32 bytes | b"DINRCEND"

The trailer comes last, so a file cut short anywhere lacks it; the length and the
SHA-256 catch anything else (a flipped byte, a file from another writer).

:func:`save_checkpoint` streams the payload into a temporary file in the target's
directory, fsyncs it, renames it over the target (atomic on POSIX and Windows) and
fsyncs the directory, so a crash leaves either the old file or the new one, never a
mix. :func:`load_checkpoint` verifies before unpickling and raises
:class:`CheckpointError` with the reason. :func:`latest_valid_checkpoint` walks back
from the newest file to the first one that loads; :func:`prune_checkpoints` keeps the
newest N intact ones.

Loading uses ``torch.load(weights_only=True)`` by default: tensors, dicts, lists,
tuples, numbers, strings (model and optimizer ``state_dict``s, the output of
:func:`capture_rng_state`). Pass ``weights_only=False`` only for files you trust.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinrec.errors import DinrecError

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

MAGIC = b"DINRCKPT"
END_MAGIC = b"DINRCEND"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII")  # magic, version, reserved
_TRAILER = struct.Struct("<Q32s8s")  # payload length, sha256, end magic
_TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20



class CheckpointError(DinrecError):
    """A checkpoint file is missing, truncated, corrupt or cannot be written."""


# ------------------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    """A write-only stream that forwards to a file and hashes what passes through."""

    def __init__(self, f: io.BufferedWriter):
        self._f = f
        self.sha = hashlib.sha256()
        self.length = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self._f.write(mv)
        self.sha.update(mv)
        self.length += len(mv)
        return len(mv)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically, with a length and SHA-256 trailer.

    The parent directory is created if needed. On any failure the temporary file is
    removed and an existing file at ``path`` is left untouched.

    Returns:
        The path written.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint state must be a dict, got {type(state).__name__}")
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
    try:
        with open(tmp, "xb") as f:
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, 0))
            writer = _HashingWriter(f)
            torch.save(state, writer)  # type: ignore[arg-type]  # a binary stream
            f.write(_TRAILER.pack(writer.length, writer.sha.digest(), END_MAGIC))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - best effort cleanup
            log.warning("could not remove temporary checkpoint %s", tmp)
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: could not write checkpoint: {e}") from e
        raise
    log.debug("saved checkpoint %s", path)
    return path


# ------------------------------------------------------------------------- reading


def _read_verified_payload(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes, no header)")
            magic, version, _ = _HEADER.unpack(head)
            if magic != MAGIC:
                raise CheckpointError(
                    f"{path}: not a dinrec checkpoint (bad magic {magic!r}); "
                    "was it written by save_checkpoint?"
                )
            if version != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path}: checkpoint format version {version}, this dinrec reads "
                    f"version {FORMAT_VERSION}"
                )
            if size < _HEADER.size + _TRAILER.size:
                raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes, no trailer)")
            f.seek(size - _TRAILER.size)
            length, digest, end = _TRAILER.unpack(f.read(_TRAILER.size))
            if end != END_MAGIC:
                raise CheckpointError(
                    f"{path}: truncated or unfinished checkpoint (no end marker; {size} bytes)"
                )
            expected_len = size - _HEADER.size - _TRAILER.size
            if length != expected_len:
                raise CheckpointError(
                    f"{path}: corrupt checkpoint (trailer says {length} payload bytes, "
                    f"file holds {expected_len})"
                )
            f.seek(_HEADER.size)
            payload = bytearray(length)
            view = memoryview(payload)
            sha = hashlib.sha256()
            got = 0
            while got < length:
                n = f.readinto(view[got : got + _CHUNK])
                if not n:
                    raise CheckpointError(f"{path}: file shrank while reading")
                sha.update(view[got : got + n])
                got += n
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint: {e}") from e
    if sha.digest() != digest:
        raise CheckpointError(f"{path}: corrupt checkpoint (SHA-256 of the payload mismatch)")
    return bytes(payload)


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Check framing, length and SHA-256 without unpickling; raise CheckpointError if bad."""
    _read_verified_payload(Path(path))


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Verify and load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        map_location: as in ``torch.load``; CPU by default.
        weights_only: ``torch.load``'s restricted unpickler (safe for untrusted files).

    Raises:
        CheckpointError: missing, truncated, corrupt, or not loadable.
    """
    path = Path(path)
    payload = _read_verified_payload(path)
    try:
        state = torch.load(
            io.BytesIO(payload), map_location=map_location, weights_only=weights_only
        )
    except Exception as e:
        hint = (
            " (it holds objects the weights_only loader refuses; pass weights_only=False "
            "if you trust the file)"
            if weights_only
            else ""
        )
        raise CheckpointError(f"{path}: checksum ok but torch.load failed: {e}{hint}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint holds {type(state).__name__}, not a dict")
    return state


# ------------------------------------------------------------------------- RNG


def capture_rng_state(devices: Iterable[int] | None = None) -> dict[str, Any]:
    """Python, NumPy (legacy global) and torch RNG states, in a ``weights_only``-safe form.

    CUDA generator states are included when CUDA is available (all devices, or
    ``devices``).
    """
    np_state: Any = np.random.get_state()  # noqa: NPY002 - the legacy global is what we save
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        ids = list(devices) if devices is not None else list(range(torch.cuda.device_count()))
        state["cuda"] = {i: torch.cuda.get_rng_state(i) for i in ids}
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA only where available)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            n["bit_generator"],
            np.asarray(n["keys"].numpy(), dtype=np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in state["cuda"].items():
            torch.cuda.set_rng_state(s, int(i))
