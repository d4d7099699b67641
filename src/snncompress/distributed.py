"""Data-parallel training under ``torchrun``: process group, sharded batches, reductions, rank-0 writes.

Launched as ``torchrun --nproc_per_node N -m snncompress.cli run RECIPE --out DIR``,
every process runs the whole recipe; :func:`init_from_env` joins the process
group (NCCL on GPUs, gloo on CPUs) from torchrun's environment. Training
steps are data parallel: each global batch of ``data.batch_size`` images is
split across the ranks (:class:`ShardedLoader`, rank ``r`` takes images
``r, r + N, ...``), so an epoch covers the training split exactly once and the
batch the optimizer sees is the same as in one process. Every other part of
a stage (calibration, PCA, validation, measurement) runs on each rank on the
same data and gives the same result; only rank 0 writes files
(:func:`is_writer`, checked by :func:`snncompress.io.atomic_write`).

Without torchrun every helper here is a no-op (world size 1).
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read); no-op alone."""
    if active():
        dist.barrier()


def init_from_env(timeout_s: float = 1800.0) -> torch.device | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns this rank's device.

    NCCL and ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU.
    Returns None (and does nothing) outside torchrun.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
        return device
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over the ranks (float64); unchanged alone."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(row: torch.Tensor) -> torch.Tensor:
    """Stack every rank's 1-D ``row`` (same shape and dtype on all ranks) into ``[world, n]``."""
    if not active():
        return row[None]
    rows = [torch.empty_like(row) for _ in range(world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows)


class ShardedLoader:
    """This rank's share of each global batch of ``loader`` (images ``rank::world``).

    Iterating yields ``(images [b, ...], labels [b], global_count)`` where ``b``
    is about ``B / world`` and ``global_count`` the global batch's size; the
    augmentation is drawn for the whole global batch first, so the union of
    the shards is exactly the single-process batch. ``len`` and the epoch
    counter are the wrapped loader's.
    """

    def __init__(self, loader, rank_: int, world: int):
        self.loader, self.rank, self.world = loader, rank_, world

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images[self.rank::self.world], labels[self.rank::self.world], labels.shape[0]


def wrap_model(model: torch.nn.Module, device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when a process group is active, else itself.

    Unused parameters are allowed (an ANN-mode forward skips the LIF leaks and
    thresholds); buffers are not re-broadcast each step (masks are bool, which
    gloo does not broadcast, and every rank computes the same buffers).
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if torch.device(device).type == "cuda" else None
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
    # a 1-channel conv's weight has two equivalent stride layouts; DDP warns about the one its grad takes
    warnings.filterwarnings("ignore", message=".*Grad strides do not match bucket view strides.*")
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True, forward_sync_buffers=False,
                                   init_sync=False)
