"""One run over several processes (GPUs, machines) with PyTorch's own engine.

Launch the usual command under ``torchrun`` (or ``accelerate launch``, which sets the
same environment variables)::

    torchrun --nproc-per-node 4 -m sls.cli run --data ~/vtab-1k/dtd --out runs/dtd
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 \\
        --nproc-per-node 8 -m sls.cli run ...

:func:`session` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` and opens the process group: NCCL for CUDA tensors and Gloo for CPU
ones on a GPU machine, Gloo alone on CPU. Nothing here does anything outside a
process group of two or more processes, so a plain ``sls run`` is untouched.

Inside one:

- training (:func:`shuffled_shard`, :func:`data_parallel`): each process draws its
  share of every shuffled epoch from a :class:`DistributedSampler` and the model is
  wrapped in :class:`DistributedDataParallel`, which averages the gradients of the
  trainable parameters (PETL modules and head) only: frozen parameters are not in its
  reducer at all. ``batch_size`` stays the global batch, split evenly between the
  processes, so a recipe means the same thing on 1 or 8 GPUs.
- passes in order (:func:`ordered_shard`: block features, test predictions): each
  process runs its share, and every result is gathered back into the loader's order
  on every process, with the sampler's padding dropped. The gathered features equal
  the single-process ones to float32 round-off (the batches are composed differently,
  which can move the last bits of a matrix product); ``tests/test_distributed.py``
  checks 1e-5.
- everything else (t-SNE, the choice of k, writing the task folder, timing the
  throughput) runs on the main process only (:func:`run_on_main`) and its result is
  sent to the others, which wait.

A multi-machine run needs its task folder on a file system every machine sees. To
spread many tasks over machines that share nothing, split a sweep instead
(``sls sweep --shard``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from sls.errors import ConfigError, SLSError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun (and accelerate launch) set for every process."""

TIMEOUT = timedelta(minutes=60)
"""How long a process waits for the others at a collective call: the main process's
t-SNE of every block runs while they wait."""

T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by a launcher with two or more processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of two or more processes is open."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the process that writes files and prints (rank 0), and outside a group."""
    return rank() == 0


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[None]:
    """Open the process group described by the launcher's environment, close it after.

    Does nothing when the process was not launched with ``WORLD_SIZE`` > 1 or a group
    is already open (the caller's then).

    Args:
        device: the run's device option; ``cpu`` keeps a GPU machine on Gloo alone.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield
        return
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} are not: start several processes with "
                          "torchrun (or accelerate launch), which sets them all")  # fmt: skip
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run one process")
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the main process only; every process returns its result.

    The others wait for it. If it raises, it raises on every process (an
    :class:`SLSError` of the same class and message where it was one, so every process
    reports the user's error alike), and none is left waiting. Outside a process
    group this is a plain call.
    """
    if not active():
        return fn(*args, **kwargs)
    message: list = [None]
    if is_main():
        try:
            message[0] = ("result", fn(*args, **kwargs))
        except BaseException as err:
            kind = f"user error {type(err).__name__}" if isinstance(err, SLSError) else "error"
            message[0] = (kind, str(err) or type(err).__name__)
            dist.broadcast_object_list(message, src=0)
            raise
    dist.broadcast_object_list(message, src=0)
    kind, value = message[0]
    if kind.startswith("user error"):  # the same class everywhere, so every process takes the same branch
        import sls.errors

        cls = getattr(sls.errors, kind.rpartition(" ")[2], SLSError)
        raise (cls if isinstance(cls, type) and issubclass(cls, SLSError) else SLSError)(value)
    if kind == "error":
        raise RuntimeError(f"the main process (rank 0) failed: {value}")
    return value


def sum_over_processes(*values: float) -> list[float]:
    """Each value summed over the processes (the values themselves outside a group)."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def _all_gather(local: torch.Tensor) -> list[torch.Tensor]:
    # CPU tensors: Gloo carries them, also beside NCCL on a GPU machine.
    local = local.detach().cpu().contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return parts


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def ordered_shard(loader: DataLoader) -> tuple[DataLoader, Callable[[torch.Tensor], torch.Tensor]]:
    """This process's share of an in-order loader, and how to gather results back.

    The share comes from a :class:`DistributedSampler` without shuffling: sample
    position p of its padded list goes to process ``p % world_size``, and the list is
    ``0..n-1`` followed by repeats of the first samples to make the shares equal. The
    returned function takes a tensor of per-sample rows computed over the share, in
    the share's order, gathers every process's rows and returns the ``n`` rows of the
    original samples in the loader's order, the padding dropped, on every process.

    Outside a process group, or for a loader that does not read its dataset in order,
    this is the loader itself and the identity (every process then runs all of it).
    """
    if not active() or not isinstance(loader.sampler, SequentialSampler):
        return loader, _identity
    n, world, me = len(loader.dataset), world_size(), rank()
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=me, shuffle=False, drop_last=False)
    positions = range(me, sampler.total_size, world)
    if list(sampler) != [p % n for p in positions]:
        raise RuntimeError("DistributedSampler no longer deals samples round-robin; sls.distributed needs updating")
    share = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                       collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, generator=loader.generator)  # fmt: skip

    def gather(local: torch.Tensor) -> torch.Tensor:
        if len(local) != len(positions):
            raise RuntimeError(f"expected {len(positions)} rows from this process's share, got {len(local)}")
        # Row j of process r is padded position r + j * world: interleaving the parts
        # restores the padded list, whose first n rows are samples 0..n-1.
        return torch.stack(_all_gather(local), dim=1).flatten(0, 1)[:n]

    return share, gather


def shuffled_shard(loader: DataLoader) -> DataLoader:
    """This process's share of a shuffled training loader (the loader itself outside a group).

    Each epoch is shuffled with the seed of the loader's generator (0 without one) by
    a :class:`DistributedSampler`; call :func:`set_epoch` before each epoch. The
    loader's batch size is the global batch: each process takes an equal part of it.
    """
    if not active():
        return loader
    world = world_size()
    if loader.batch_size is None or loader.batch_size % world:
        raise ConfigError(f"the batch size ({loader.batch_size}) is the global batch of the {world} processes: "
                          f"make it a multiple of {world}")  # fmt: skip
    seed = loader.generator.initial_seed() if loader.generator is not None else 0
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank(), shuffle=True, seed=seed,
                                 drop_last=False)  # fmt: skip
    return DataLoader(loader.dataset, batch_size=loader.batch_size // world, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, generator=torch.Generator())  # fmt: skip


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a :func:`shuffled_shard` loader which epoch starts (its shuffle depends on it)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def data_parallel(model: nn.Module) -> nn.Module:
    """The model wrapped for data-parallel training (the model itself outside a group).

    Gradients of the trainable parameters are averaged over the processes after every
    backward pass; frozen parameters are left out by DDP itself. Every trainable
    parameter takes part in every forward pass (the PETL modules of every kept block
    and the head), so ``find_unused_parameters`` stays off and costs nothing. On
    construction DDP copies the main process's parameters and buffers to the others;
    buffers are not synced again before each forward, since ViT and Swin buffers are
    constants (Swin's relative-position indices and attention masks).
    """
    if not active():
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   forward_sync_buffers=False, find_unused_parameters=False)  # fmt: skip
