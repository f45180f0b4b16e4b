"""Running on many processes with PyTorch's own engine: ``torch.distributed``, started by
``torchrun`` (one process per GPU, or several CPU processes; one node or many).

    dist = init_distributed()          # reads torchrun's RANK / WORLD_SIZE; a plain run is world 1
    mine = dist.shard(files)           # this process's disjoint share
    total = dist.sum([done])[0]        # every rank gets the same answer
    if dist.is_main: write(...)        # one writer

A plain ``python``/``casam`` run is a world of one: every helper is then a no-op, so the
commands have one code path. The backend is ``nccl`` for CUDA devices and ``gloo`` otherwise.
Everything that crosses processes is a tensor or JSON text, never a pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Sequence, TypeVar

import torch

from .errors import CASamError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0  # a peer silent this long is taken for dead (the collective raises)


class DistributedError(CASamError):
    """A collective failed: a peer process died or lost its connection. Nothing was written."""


# what a collective raises when a peer is gone (DDP's gradient average included)
DIST_FAILURES = (DistributedError, torch.distributed.DistError) if torch.distributed.is_available() \
    else (DistributedError,)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world}" if self.active else "one process"

    # -- sharding ----------------------------------------------------------------------
    def owner(self, index: int) -> int:
        """The rank that takes item ``index`` of a list (round robin)."""
        return index % self.world

    def shard(self, items: Sequence[T]) -> List[T]:
        """This rank's items: every ``world``-th, starting at ``rank`` (disjoint; together all)."""
        return list(items)[self.rank::self.world]

    def shard_by_size(self, items: Sequence[T], sizes: Sequence[float]) -> List[T]:
        """This rank's items when they differ in cost: largest first, each to the least loaded
        rank (deterministic: every rank computes the same plan)."""
        load = [0.0] * self.world
        plan: List[List[int]] = [[] for _ in range(self.world)]
        for i in sorted(range(len(items)), key=lambda k: (-float(sizes[k]), k)):
            r = min(range(self.world), key=lambda q: (load[q], q))
            plan[r].append(i)
            load[r] += float(sizes[i])
        return [items[i] for i in sorted(plan[self.rank])]

    # -- collectives (tensors only) ---------------------------------------------------
    def _run(self, what: str, fn):
        try:
            return fn()
        except RuntimeError as exc:  # torch.distributed.DistError is one
            raise DistributedError(f"{self.describe()}: {what} failed, a peer process has stopped or is "
                                   f"unreachable ({str(exc).splitlines()[0][:200]})") from exc

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            # a barrier as a tiny all-reduce: the same failure path and timeout as the others
            self.sum([0.0])

    def sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        self._run("a sum over the processes", lambda: torch.distributed.all_reduce(t))
        return t.cpu().tolist()

    def max(self, value: float) -> float:
        if not self.active:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        self._run("a maximum over the processes",
                  lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX))
        return float(t.item())

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``tensor`` from rank ``src`` on every rank (the others' ``tensor`` gives shape and dtype)."""
        if not self.active:
            return tensor
        t = tensor.to(self._device()).contiguous()
        self._run(f"sending data from rank {src}", lambda: torch.distributed.broadcast(t, src))
        return t.to(tensor.device)

    def gather_json(self, obj) -> list:
        """Every rank's JSON-able ``obj``, in rank order, on every rank (sent as UTF-8 bytes)."""
        if not self.active:
            return [obj]
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
        sizes = [int(s) for s in self.sum([len(data) if r == self.rank else 0 for r in range(self.world)])]
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[:len(data)] = data
        out = []
        for r in range(self.world):
            got = self.broadcast(padded.clone(), r)
            out.append(json.loads(bytes(got[:sizes[r]].tolist()).decode()))
        return out

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """This process's place in a ``torchrun`` job (a world of one when not launched by it).

    ``device``: the command's ``--device``; with CUDA each process takes the GPU of its
    ``LOCAL_RANK`` and the backend is ``nccl``, otherwise ``gloo``."""
    if not launched_by_torchrun():
        return Dist()
    if not torch.distributed.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed: run one process, without torchrun")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_for_rank(device, local_rank).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {rank} of {world}: could not join the process group "
                                   f"({str(exc).splitlines()[0][:200]})") from exc
    return Dist(rank, world, local_rank, backend)


def device_for_rank(device: str, local_rank: int) -> str:
    """``--device`` for one process of a torchrun job: "auto" and "cuda" mean this process's
    own GPU (``cuda:LOCAL_RANK``) when CUDA is there, else the CPU; anything else as given."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    if device == "auto":
        return "cpu"
    return device
