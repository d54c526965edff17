"""Data-parallel training over several processes: context and collectives.

One process per device (or per CPU worker). Every process runs the same
training function; this module gives it:

* :func:`setup`: the process group from the usual environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, as ``torchrun`` sets them), gloo on
  CPU and NCCL on CUDA (one GPU per process: ``cuda:LOCAL_RANK``). Without
  ``WORLD_SIZE`` > 1 it is a no-op and everything below degrades to the 1-process case.
* collectives the trainer needs: :func:`rank0_call` (do file work on rank 0, raise the
  same error everywhere), :func:`broadcast_object`, :func:`all_gather_arrays`
  (variable-length NumPy arrays: padded to the longest, with lengths),
  :func:`sync_buffers` (BatchNorm running statistics from rank 0),
  :func:`replica_digests` (a SHA-256 of every rank's weights: replicas must agree).

``dinrec train --nproc N`` starts N workers on this machine with PyTorch's own elastic
launcher (``python -m torch.distributed.run --standalone``), as ``torchrun`` would.

See ``docs/distributed.md`` for the commands, the global batch and the tolerances.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from dinrec.errors import DinrecError

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "DistContext",
    "setup",
    "teardown",
    "rank0_call",
    "broadcast_object",
    "all_gather_arrays",
    "all_gather_objects",
    "sync_buffers",
    "replica_digests",
    "state_digest",
    "free_port",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank, backend, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"
    owns_group: bool = False  # True if setup() created the process group (teardown ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise DinrecError(f"environment variable {name}={value!r}: expected an integer") from None


def setup(device: str = "cpu", timeout_s: float = 1800.0) -> DistContext:
    """The process group of this run, from the environment (a no-op for one process).

    ``device`` is the run's device: ``cpu`` (gloo) or ``cuda`` (NCCL, this process gets
    ``cuda:LOCAL_RANK``). An already initialised default group is reused as it is.
    """
    world = _env_int("WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    if world <= 1:
        return DistContext(device=device)
    if not dist.is_available():  # pragma: no cover - every official build has it
        raise DinrecError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    device_type = torch.device(device).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise DinrecError("--device cuda, but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise DinrecError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        backend = "nccl"
    elif device_type == "cpu":
        backend = "gloo"
    else:
        raise DinrecError(f"distributed training supports cpu and cuda, not {device!r}")
    owns = False
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise DinrecError(
                    f"WORLD_SIZE={world} but {var} is not set; start with torchrun or "
                    "`dinrec train --nproc N` (see docs/distributed.md)"
                )
        nccl: dict[str, Any] = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            **nccl,
        )
        owns = True
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("rank %d of %d (local rank %d, %s, %s)", rank, world, local_rank, backend, device)
    return DistContext(rank, world, local_rank, backend, device, owns)


def teardown(ctx: DistContext) -> None:
    """End the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives
def broadcast_object(ctx: DistContext, obj: Any = None, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; tensors travel too)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def rank0_call(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    A :class:`DinrecError` raised by ``fn`` is raised on every rank (no rank is left
    waiting in a collective for one that gave up).
    """
    if not ctx.enabled:
        return fn()
    result: tuple[str, Any] = ("ok", None)
    if ctx.is_main:
        try:
            result = ("ok", fn())
        except DinrecError as exc:
            result = ("error", exc)
    status, value = broadcast_object(ctx, result)
    if status == "error":
        raise value
    return value


def all_gather_arrays(ctx: DistContext, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Concatenate each array over the ranks, in rank order; lengths may differ per rank.

    All arrays of one rank have the same length. They are padded to the longest rank's
    length, gathered with one ``all_gather`` per array, and cut back with the lengths.
    """
    if not ctx.enabled:
        return arrays
    n = len(arrays[0]) if arrays else 0
    if any(len(a) != n for a in arrays):
        raise DinrecError("all_gather_arrays: arrays of one rank must have the same length")
    device = torch.device(ctx.device)
    lengths = torch.zeros(ctx.world_size, dtype=torch.int64, device=device)
    lengths[ctx.rank] = n
    dist.all_reduce(lengths)
    lens = lengths.cpu().tolist()
    longest = max(lens)
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a))
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype)
        padded[:n] = t
        padded = padded.to(device)
        parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:k].cpu() for p, k in zip(parts, lens, strict=True)]).numpy())
    return tuple(out)


def all_reduce_sum(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the ranks (a copy; ``value`` itself is unchanged)."""
    if not ctx.enabled:
        return value.clone()
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


@torch.no_grad()
def sync_buffers(ctx: DistContext, model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DistributedDataParallel broadcasts buffers at the start of each forward, so after the
    last step every rank holds the statistics of its own last batch; call this before
    evaluating or comparing replicas.
    """
    if not ctx.enabled:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes (bit-exact identity)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def replica_digests(ctx: DistContext, model: torch.nn.Module) -> list[str]:
    """:func:`state_digest` of every rank's model, in rank order (all equal when in sync)."""
    return all_gather_objects(ctx, state_digest(model.state_dict()))


def replica_differences(ctx: DistContext, model: torch.nn.Module) -> list[str]:
    """Names of the state entries that differ between ranks (empty when in sync)."""
    state = model.state_dict()
    mine = {k: state_digest({k: v}) for k, v in state.items()}
    every = all_gather_objects(ctx, mine)
    return [k for k in mine if len({d[k] for d in every}) > 1]


# --------------------------------------------------------------------------- launcher
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
