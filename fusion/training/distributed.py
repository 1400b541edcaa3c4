"""The train stage's process world: one plain process, or torchrun's workers.

On Kubernetes, training is a Kubeflow PyTorchJob (Master + Workers, one pod per node) or a
Kubeflow Trainer v2 TrainJob (numNodes node pods of a JobSet). The training operator sets in
every pod MASTER_ADDR and MASTER_PORT (the master pod's service), PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, and WORLD_SIZE / RANK at pod level; Trainer v2's torch
plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT
(node 0's address in the JobSet's headless Service). Every pod runs `fusion train SPEC`, which
starts torchrun's agent in its own process (`launch`): the agents meet at MASTER_ADDR:MASTER_PORT,
or PET_MASTER_ADDR:PET_MASTER_PORT (c10d rendezvous), each starts PET_NPROC_PER_NODE
workers running `fusion train SPEC` again, now with torchrun's RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, from which `init` builds the process group (NCCL on GPUs, gloo on
CPUs). No ssh, no hostfile: nothing but the environment. `launch` returns the exit code of the
first failed worker (3: bad input, do not retry; 143: preempted; 201: its peers went away),
which torchrun itself would flatten to 1, and 201 when the rendezvous itself fails (the master
pod is gone). 201 is 128 or more, so the training operator restarts the pod (restartPolicy
ExitCode) and training resumes from the newest checkpoint. The same thing with torchrun as the container command (`TORCHRUN_COMMAND`, with
Kubernetes' $(VAR) expansion) works as well, with torchrun's exit codes.

Without torchrun and with train.engine=torch, the world is one plain process.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass

from fusion.errors import PEER_LOST_EXIT_CODE, FusionError, PeersLost

TORCHRUN_COMMAND = (
    "torchrun --nnodes=$(PET_NNODES) --nproc-per-node=$(PET_NPROC_PER_NODE) --rdzv-backend=c10d "
    "--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT) --rdzv-id=fusion-train -m fusion train SPEC"
)


def inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_args(worker_args: list[str], env: dict | None = None) -> list[str]:
    """torchrun's arguments for this node, from the PyTorchJob or TrainJob environment (defaults: one node,
    one process per GPU or one on CPU, a local rendezvous)."""
    import torch

    env = os.environ if env is None else env
    nproc = env.get("PET_NPROC_PER_NODE") or str(max(1, torch.cuda.device_count()))
    args = [f"--nnodes={env.get('PET_NNODES') or 1}", f"--nproc-per-node={nproc}"]
    if env.get("PET_RDZV_ENDPOINT"):
        pass  # an elastic PyTorchJob: torchrun reads PET_RDZV_BACKEND, _ENDPOINT, _ID itself
    elif env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR"):
        if env.get("MASTER_ADDR"):  # a PyTorchJob
            endpoint = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT') or 29500}"
        else:  # a Trainer v2 TrainJob
            endpoint = f"{env['PET_MASTER_ADDR']}:{env.get('PET_MASTER_PORT') or 29400}"
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=fusion-train"]
    else:
        args += ["--standalone"]
    return [*args, "-m", "fusion", "train", *worker_args]


def launch(worker_args: list[str]) -> int:
    """Run torchrun's agent in this process until its workers end; the exit code of the first
    failed worker (signals as 128 + signal), 143 if this agent got SIGTERM, else 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args(worker_args)))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode
    except SignalException as e:
        return 128 + int(e.sigval)
    except Exception as e:
        if not _is_peer_loss(e, agent=True):
            raise
        print(f"fusion: training agent lost its peers ({_short(e)}); exit {PEER_LOST_EXIT_CODE}: restart the pods, "
              "they resume from the newest checkpoint", file=sys.stderr, flush=True)
        return PEER_LOST_EXIT_CODE
    return 0


# Messages of gloo and NCCL when the process on the other end went away (a pod or node lost).
PEER_LOSS_MESSAGES = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
    "timed out", "timeout", "nccl communicator was aborted", "no route to host",
)  # fmt: skip


def _is_peer_loss(e: BaseException, agent: bool = False) -> bool:
    """Whether an error says that the other training processes went away: the rendezvous
    failed (the agent), a collective's peer disconnected (a worker)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):  # DistNetworkError, DistStoreError, DistBackendError
        return True
    if agent:
        from torch.distributed.elastic.rendezvous.api import RendezvousError

        if isinstance(e, RendezvousError):
            return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in PEER_LOSS_MESSAGES)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


@contextlib.contextmanager
def peers_lost_exit(world: "World"):
    """In a distributed world, a peer that went away mid-training (its pod or node lost) is
    PeersLost (exit PEER_LOST_EXIT_CODE, restarted by the training operator), not a crash that
    fails the job: the restarted pods resume from the newest checkpoint."""
    try:
        yield
    except Exception as e:
        if world.distributed and _is_peer_loss(e):
            raise PeersLost(f"rank {world.rank} lost the other training processes ({_short(e)}): restart the "
                            "training pods, they resume from the newest checkpoint") from None
        raise


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: str  # "cpu" or "cuda:N"
    distributed: bool  # whether a torch.distributed process group exists
    own_env: tuple[str, ...] = ()  # variables `init` set for a world of one; `close` removes them

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise FusionError(f"environment variable {name}={raw!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(engine) -> World:
    """The world of this process for `engine` (an engine class of fusion/training/engine.py,
    passed in: this module sits below it): one plain process unless it is `multi_process`."""
    import torch

    size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < size:
        raise FusionError(f"environment: RANK={rank} is not within WORLD_SIZE={size}")
    cuda = torch.cuda.is_available()
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if not engine.multi_process:
        if size != 1:
            raise FusionError(
                f"train.engine={engine.kind} trains in one process, but WORLD_SIZE={size}: set train.engine=deepspeed"
            )
        return World(0, 1, 0, device, False)

    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    own_env = {}
    if "WORLD_SIZE" not in os.environ:  # one process without torchrun: a world of one
        own_env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.update(own_env)
    import importlib
    import warnings

    import deepspeed

    # DeepSpeed calls collectives that torch marks deprecated, once per step: noise in the logs
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

    if not cuda:
        # DeepSpeed would compile its shared-memory allreduce op at start-up on CPU (over a
        # minute on a fresh machine); gloo is all the CPU path needs. (`deepspeed.comm.torch`
        # as an attribute is the torch package, hence import_module.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return World(rank, size, local_rank, device, True, tuple(own_env))


def all_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (float64), in one collective."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.distributed:
        torch.distributed.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        import torch

        torch.distributed.barrier()


def close(world: World, peers_lost: bool = False) -> None:
    if world.distributed and not peers_lost:  # with the peers gone, tearing down could wait for them
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    for name in world.own_env:
        os.environ.pop(name, None)
