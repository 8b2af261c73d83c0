"""Process group set-up, deterministic batch sharding, seeding and RNG state capture.

Sharding keeps the global batch of one process (and so do the random numbers: the stochastic layers are
reseeded per micro-batch from its place in the epoch, whatever the world size): at epoch e, a permutation of the dataset drawn from a
generator seeded by (seed, e) is cut into global batches of G = per_device x world x accumulation items
(the incomplete tail is dropped); global batch s is cut into `world x accumulation` micro-batches of
`per_device` items; rank r takes micro-batches r, r + world, r + 2*world, ... So every global batch holds
the same items whatever the world size, and the gradient of its mean loss is the same up to rounding.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from remamber.errors import RemamberError


class DeviceError(RemamberError, ValueError):
    """A --device that does not name a usable device."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (a single process without them)."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise RuntimeError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when launched with several processes."""
    if info.enabled and not dist.is_initialized():
        # Validation runs on rank 0 while the others wait at a barrier: a full val split can take longer
        # than the default collective timeout (10 min for NCCL).
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=info.rank, world_size=info.world_size, timeout=timedelta(hours=2))


def resolve_device(device: str | torch.device | None, info: DistInfo) -> torch.device:
    """The torch.device to run on, with its CUDA index filled in and made current.

    None: this process's GPU when CUDA is available, else the CPU. A bare "cuda" means this process's GPU
    too: LOCAL_RANK under torchrun, else the current CUDA device (CUDA_VISIBLE_DEVICES is honoured).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"--device {device!r}: not a device name (e.g. cpu, cuda, cuda:1)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}: CUDA is not available here (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if `flag` is true on any rank (an all-reduce; the flag itself without DDP)."""
    if not (info.enabled and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def batch_split(global_batch: int, per_device: int, world_size: int) -> int:
    """Gradient-accumulation steps so that global = per_device x world x accumulation (else an error)."""
    if global_batch % (per_device * world_size):
        raise ValueError(
            f"train.global_batch_size {global_batch} is not divisible by train.per_device_batch_size "
            f"{per_device} x world size {world_size}")
    return global_batch // (per_device * world_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """One 63-bit seed per (seed, epoch), stable across Python versions and processes."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)


def micro_batch_seed(seed: int, epoch: int, micro_index: int) -> int:
    """Seed of the stochastic layers (dropout, drop-path) for one micro-batch, identified by its place in the
    epoch's sequence of micro-batches of one process (see `GlobalBatchSampler.global_micro_index`)."""
    return int(np.random.SeedSequence([seed, epoch, micro_index, 0xD0]).generate_state(1, dtype=np.uint64)[0]) \
        & ((1 << 63) - 1)


class GlobalBatchSampler:
    """Batch sampler of one rank for one epoch (see the module docstring); yields lists of indices."""

    def __init__(self, n_items: int, per_device: int, world_size: int, rank: int, accumulation: int,
                 seed: int, epoch: int) -> None:
        self.n_items, self.per_device, self.world, self.rank = n_items, per_device, world_size, rank
        self.accumulation, self.seed, self.epoch = accumulation, seed, epoch
        self.global_batch = per_device * world_size * accumulation
        self.steps = n_items // self.global_batch

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.n_items, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.order()
        for step in range(self.steps):
            chunk = perm[step * self.global_batch:(step + 1) * self.global_batch]
            for a in range(self.accumulation):
                m = a * self.world + self.rank
                yield chunk[m * self.per_device:(m + 1) * self.per_device]

    def __len__(self) -> int:
        return self.steps * self.accumulation

    def global_micro_index(self, local_index: int) -> int:
        """Index, among all micro-batches of the epoch (as one process would run them), of this rank's
        `local_index`-th micro-batch."""
        step, k = divmod(local_index, self.accumulation)
        return step * self.accumulation * self.world + k * self.world + self.rank


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    if deterministic:
        # CUBLAS needs this before its first use for deterministic matmuls on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: a few CUDA kernels (e.g. bilinear upsampling backward) have no deterministic version.
        _deterministic_algorithms()


def _deterministic_algorithms() -> None:
    """torch.use_deterministic_algorithms(True, warn_only=True), less its import of torch._inductor's config
    (1.5 s of every training process; it sets inductor's flag, which only torch.compile reads, and we
    do not compile). Where inductor is loaded already, or torch lacks the switch, the public call."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (on every rank)."""
    mine = rng_state()
    if not (info.enabled and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class BatchNormReplay:
    """BatchNorm running statistics under DDP, exactly as one process accumulating gradients keeps them.

    Each micro-batch is normalised with its own statistics in both set-ups (per_device items), but one
    process updates the running mean/var after every micro-batch of a step, in order, while each DDP
    process sees only its share (and DDP would broadcast rank 0's). So the batch statistics of every
    micro-batch are recorded (a forward pre-hook), gathered from all ranks at the end of the step, and the
    momentum updates replayed in the one-process order (micro-batch k of rank r is number k * world + r)
    from the statistics before the step, on every rank alike.
    """

    def __init__(self, model: nn.Module, info: DistInfo) -> None:
        self.info = info
        self.modules = [m for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.records: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self.before: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        for i, module in enumerate(self.modules):
            module.register_forward_pre_hook(self._hook(i))

    def _hook(self, i: int):
        def record(module: nn.Module, args: tuple) -> None:
            if not module.training:
                return
            if self.before is None:  # first micro-batch of the step: keep the statistics to replay from
                self.before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                               for m in self.modules]
            x = args[0].detach().float()
            dims = [0, *range(2, x.dim())]
            # What BatchNorm folds into running_var: the unbiased variance of the batch.
            self.records[i].append(torch.stack([x.mean(dims), x.var(dims, unbiased=True)]))
        return record

    @torch.no_grad()
    def finish_step(self) -> None:
        """Replay the step's updates (call once per optimizer step, after its last micro-batch)."""
        if not self.modules or self.before is None:
            return
        counts = {len(r) for r in self.records}
        if len(counts) != 1:
            raise RuntimeError(f"BatchNorm layers saw different numbers of micro-batches: {sorted(counts)}")
        local = torch.cat([torch.stack(r).flatten(1) for r in self.records], dim=1)  # (accumulation, sum 2C)
        gathered = [torch.empty_like(local) for _ in range(self.info.world_size)]
        dist.all_gather(gathered, local.contiguous())
        ordered = torch.stack(gathered, dim=1).flatten(0, 1)  # (accumulation * world, sum 2C), k-major
        offset = 0
        for module, (mean, var, tracked) in zip(self.modules, self.before):
            c = module.num_features
            stats = ordered[:, offset:offset + 2 * c].reshape(-1, 2, c).to(mean.device)
            offset += 2 * c
            mean, var, tracked = mean.clone(), var.clone(), tracked.clone()
            for batch_mean, batch_var in stats:
                tracked += 1
                factor = 1.0 / float(tracked) if module.momentum is None else module.momentum
                mean.mul_(1 - factor).add_(batch_mean.to(mean.dtype), alpha=factor)
                var.mul_(1 - factor).add_(batch_var.to(var.dtype), alpha=factor)
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            module.num_batches_tracked.copy_(tracked)
        self.records = [[] for _ in self.modules]
        self.before = None
