"""Data-parallel GISP on existing engines: ``torchrun`` or ``accelerate launch``.

Every rank holds the whole (masked) model and the whole calibration set, and
runs forward/backward on its own shard of the samples. The shard gradients are
summed with one all-reduce, so every rank scores the same gradient of the same
mean loss as a single process would (up to float summation order), picks the
same structures and applies the same mask. Only rank 0 writes files.

Nothing here does anything unless ``WORLD_SIZE > 1``: a plain ``python`` or
``gisp prune`` run is a world of one and never touches ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from gisp.core.ranking import Pick
from gisp.errors import GispError

SHARDS = ("strided", "contiguous")
_KINDS = ("head", "channel")
_BUCKET_BYTES = 64 * 2**20  # all-reduce buffer: bounds the extra memory of flattening gradients


def env_world_size() -> int:
    """World size the launcher asked for (``WORLD_SIZE``, set by torchrun and accelerate launch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise GispError(f"WORLD_SIZE must be an integer, got '{os.environ['WORLD_SIZE']}'") from e


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group the launcher described, if it described one; True when distributed.

    Backend: nccl when CUDA is available, gloo otherwise. On CUDA every rank
    uses ``cuda:LOCAL_RANK`` as its current device, so ``--device cuda`` (or
    auto) puts each rank's model on its own GPU.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1:
        return False
    if not dist.is_available():
        raise GispError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise GispError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun or accelerate launch")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (end of a CLI run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the only one that writes files and prints."""
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if active() else None


def shard_indices(n: int, rank: int, world: int, mode: str = "strided", block: int = 1) -> list[int]:
    """The calibration samples of one rank: disjoint, together all ``n``, deterministic.

    Samples are dealt in blocks of ``block`` consecutive ones (the pruning loop
    passes its micro-batch size, so every micro-batch of a rank is exactly one
    micro-batch of the single-process run and computes the same gradient).
    ``strided``: rank r takes blocks r, r+world, ... (balances work when samples
    are sorted by length, as the task objectives sort them); ``contiguous``: one
    run of blocks per rank. Block counts differ by at most one between ranks.
    """
    if mode not in SHARDS:
        raise GispError(f"unknown shard mode '{mode}': use one of {', '.join(SHARDS)}")
    if not 0 <= rank < world:
        raise GispError(f"rank {rank} is outside a world of {world}")
    if block < 1:
        raise GispError(f"shard block must be at least 1, got {block}")
    blocks = -(-n // block)
    if mode == "strided":
        mine = range(rank, blocks, world)
    else:
        base, extra = divmod(blocks, world)
        start = rank * base + min(rank, extra)
        mine = range(start, start + base + (1 if rank < extra else 0))
    return [i for b in mine for i in range(b * block, min(n, (b + 1) * block))]


def _comm_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else torch.device("cpu")


def all_reduce_sum_(tensors: Iterable[torch.Tensor], bucket_bytes: int = _BUCKET_BYTES) -> None:
    """Sum tensors over all ranks, in place, flattening small ones into bounded buckets (fewer calls).

    Tensors on a device the backend cannot move (CPU tensors under NCCL) go
    through the communication device and back.
    """
    if not active():
        return
    comm = _comm_device()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), ts in groups.items():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in ts + [None]:
            nbytes = 0 if t is None else t.numel() * t.element_size()
            if bucket and (t is None or size + nbytes > bucket_bytes):
                _reduce_bucket(bucket, device, comm)
                bucket, size = [], 0
            if t is not None:
                bucket.append(t)
                size += nbytes


def _reduce_bucket(bucket: list[torch.Tensor], device: torch.device, comm: torch.device) -> None:
    movable = device.type == comm.type
    if len(bucket) == 1 and movable and bucket[0].is_contiguous():
        dist.all_reduce(bucket[0])
        return
    flat = torch.cat([t.reshape(-1) for t in bucket]).to(comm)
    dist.all_reduce(flat)
    flat = flat.to(device)
    offset = 0
    for t in bucket:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_float(value: float) -> float:
    """Sum of a Python float over all ranks (float64)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if backend() == "nccl" else None)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_picks(picks: list[Pick]) -> tuple[list[Pick], bool]:
    """Rank 0's picks on every rank, and whether this rank's own picks were the same.

    Selection is deterministic given identical all-reduced gradients, so the
    picks agree; broadcasting them anyway guarantees every rank applies the
    same mask even if some kernel were not bit-reproducible across ranks.
    """
    if not active():
        return picks, True
    comm = _comm_device()
    mine = torch.tensor([[_KINDS.index(p.kind), p.layer, p.index] for p in picks], dtype=torch.int64,
                        device=comm).reshape(-1, 3)
    count = torch.tensor([len(picks)], dtype=torch.int64, device=comm)
    dist.broadcast(count, src=0)
    theirs = mine if rank() == 0 else torch.empty((int(count.item()), 3), dtype=torch.int64, device=comm)
    dist.broadcast(theirs, src=0)
    same = theirs.shape == mine.shape and bool(torch.equal(theirs, mine))
    if rank() == 0:
        return picks, True
    return [Pick(_KINDS[k], int(la), int(i)) for k, la, i in theirs.cpu().tolist()], same
