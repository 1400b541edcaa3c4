"""A training process whose peers went away (a pod or node lost) exits with the retryable code
201, which the training operators restart, not as a crash that fails the job. The whole story
(a lost master node, the restarts, the resume from the checkpoint) runs in the simulated
cluster (tests/test_k8s_sim.py); these are the decisions it rests on."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousError

from fusion.errors import PEER_LOST_EXIT_CODE, PeersLost
from fusion.training import distributed
from fusion.training.distributed import World

TWO_RANKS = World(rank=1, size=2, local_rank=0, device="cpu", distributed=True)
ONE_PROCESS = World(rank=0, size=1, local_rank=0, device="cpu", distributed=False)


@pytest.mark.parametrize(
    "error",
    [
        dist.DistNetworkError("failed to recv, got 0 bytes"),
        dist.DistStoreError("Socket Timeout"),
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"),
        RuntimeError("NCCL communicator was aborted on rank 1"),
    ],
)
def test_a_lost_peer_is_recognized(error):
    assert distributed._is_peer_loss(error)
    assert distributed._is_peer_loss(error, agent=True)


def test_rendezvous_errors_are_peer_loss_for_the_agent_only():
    assert distributed._is_peer_loss(RendezvousClosedError(), agent=True)
    assert distributed._is_peer_loss(RendezvousError("the master is gone"), agent=True)
    assert not distributed._is_peer_loss(RendezvousError("the master is gone"))


@pytest.mark.parametrize("error", [ValueError("bad shape"), RuntimeError("CUDA out of memory"), KeyError("x")])
def test_other_errors_are_not_peer_loss(error):
    assert not distributed._is_peer_loss(error, agent=True)


def test_a_worker_that_lost_its_peers_raises_peers_lost():
    with pytest.raises(PeersLost) as caught:
        with distributed.peers_lost_exit(TWO_RANKS):
            raise RuntimeError("Connection closed by peer [10.0.0.7]:29500")
    assert caught.value.exit_code == PEER_LOST_EXIT_CODE == 201
    assert "rank 1" in str(caught.value) and "resume from the newest checkpoint" in str(caught.value)


def test_errors_of_one_process_or_of_the_code_pass_through():
    with pytest.raises(RuntimeError, match="Connection closed"):
        with distributed.peers_lost_exit(ONE_PROCESS):  # no peers to lose: a real error
            raise RuntimeError("Connection closed by peer")
    with pytest.raises(ValueError):
        with distributed.peers_lost_exit(TWO_RANKS):
            raise ValueError("a bug, not a lost peer")


def test_the_agent_exits_201_when_the_rendezvous_fails(monkeypatch, capsys):
    """The master pod is gone: the agents of the other nodes cannot rendezvous."""
    import torch.distributed.run as torchrun

    def rendezvous_fails(args):
        raise RendezvousError("The node 'worker-0' has failed to connect to master 10.0.0.5:29500")

    monkeypatch.setattr(torchrun, "run", rendezvous_fails)
    assert distributed.launch(["spec.yaml"]) == PEER_LOST_EXIT_CODE
    assert "lost its peers" in capsys.readouterr().err


def test_the_agent_passes_on_a_workers_exit_code(monkeypatch):
    """torchrun would flatten a worker's 201 (or 3, bad input) to 1; the agent keeps it."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    for code in (PEER_LOST_EXIT_CODE, 3):

        def worker_failed(args, code=code):
            failure = ProcessFailure(local_rank=0, pid=4242, exitcode=code, error_file="")
            raise ChildFailedError("fusion", {1: failure})

        monkeypatch.setattr(torchrun, "run", worker_failed)
        assert distributed.launch(["spec.yaml"]) == code


def test_the_agent_raises_what_is_not_a_lost_peer(monkeypatch):
    import torch.distributed.run as torchrun

    def broken(args):
        raise ValueError("not a distributed failure")

    monkeypatch.setattr(torchrun, "run", broken)
    with pytest.raises(ValueError):
        distributed.launch(["spec.yaml"])
