"""The processes of a run: who this process is, how it talks to the others, and the device mesh.

    world = World.from_env(device, ep=2, timeout_s=600)   # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    world.rank, world.size, world.main                    # main: rank 0, the one that writes the run's files
    world.mesh                                            # DeviceMesh over all ranks ("dp",): FSDP's mesh
    world.ep_mesh, world.edp_mesh                         # with ep > 1: the 2-D mesh (edp, ep)'s two groups
    world.sum(tensor); world.barrier(); world.close()

Without torchrun's environment (or with WORLD_SIZE=1) the world has one process and no process group: every
collective is the identity, and training runs exactly the single-process code. With it, the process group is
gloo on CPU and nccl on CUDA (each process takes cuda:LOCAL_RANK), and every collective gives up after
``timeout_s``: a rank that died makes the others stop with an error instead of waiting for ever.

Rank layout with expert parallelism (ep = E_p, N ranks): rank = edp_index * E_p + ep_index, so the E_p ranks
of an expert-parallel group are neighbours (on one machine, where all-to-all is cheapest).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    ep: int = 1
    mesh: object = None  # DeviceMesh ("dp",) over every rank; None in a one-process world
    patient_group: object = None  # gloo group with a day's timeout, for waits longer than any collective's
    timeout_s: float = 600.0  # a collective's timeout (parallel.timeout_s)
    ep_mesh: object = None  # DeviceMesh of this rank's expert-parallel group (size ep); None when ep == 1
    edp_mesh: object = None  # DeviceMesh of the ranks holding the same experts (size size / ep); None when ep == 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @staticmethod
    def env_size() -> int:
        """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
        try:
            return int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None

    @classmethod
    def from_env(cls, device: torch.device, ep: int = 1, timeout_s: float = 600.0) -> "World":
        """This process's world: one process, or the torchrun job it belongs to (initialises the process group)."""
        size = cls.env_size()
        if size <= 1:
            if ep != 1:
                raise ConfigError(f"parallel.ep = {ep}: expert parallelism needs that many processes; launch with "
                                  f"torchrun --nproc-per-node {ep} (or more, a multiple of {ep})")
            return cls(device=torch.device(device))
        if size % ep:
            raise ConfigError(f"parallel.ep = {ep} does not divide the {size} processes: choose a divisor of {size}")
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (size,), mesh_dim_names=("dp",))
        patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
        world = cls(rank=rank, size=size, local_rank=local_rank, device=device, ep=ep, mesh=mesh,
                    patient_group=patient, timeout_s=timeout_s)
        if ep > 1:
            mesh2 = init_device_mesh(device.type, (size // ep, ep), mesh_dim_names=("edp", "ep"))
            world.ep_mesh, world.edp_mesh = mesh2["ep"], mesh2["edp"]
        return world

    # ------------------------------------------------------------------ collectives (identities on one process)
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``t`` over every rank (in place; returned)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks (every rank gets it)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.comm_device)
        return float(self.sum(t)) / self.size

    def barrier(self, patient: bool = False) -> None:
        """Wait for every rank; ``patient``: for as long as a day (one machine's first process preparing the data
        while the others wait), not ``parallel.timeout_s``."""
        if self.distributed:
            dist.barrier(group=self.patient_group if patient else None)

    def wait_for_main(self) -> None:
        """Every rank waits for rank 0 for as long as its writes take (a day at most); rank 0, arriving last,
        waits for the others only ``timeout_s``: they are already waiting, unless one died or stopped answering,
        which a plain barrier on the patient group would leave rank 0 waiting a day for (gloo's monitored
        barrier: each rank's own timeout)."""
        if self.distributed:
            timeout = datetime.timedelta(seconds=self.timeout_s) if self.main else datetime.timedelta(days=1)
            dist.monitored_barrier(group=self.patient_group, timeout=timeout)

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's ``text`` on every rank (as bytes in a tensor: nothing is pickled)."""
        if not self.distributed:
            return text or ""
        data = torch.tensor(list((text or "").encode()) if self.main else [], dtype=torch.uint8)
        n = torch.tensor([data.numel()], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(n, 0)
        buf = data.to(self.comm_device) if self.main else torch.empty(int(n), dtype=torch.uint8,
                                                                       device=self.comm_device)
        dist.broadcast(buf, 0)
        return bytes(buf.cpu().tolist()).decode()

    @property
    def comm_device(self) -> torch.device:
        """Where small tensors for collectives live: nccl needs them on the GPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
