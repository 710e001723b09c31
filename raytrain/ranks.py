"""The ranks of a run deciding together to stop on a deterministic error (a data error,
a non-finite loss), used by the training loop and by validation (``train/fatal.py`` says
how a stopped run ends without Ray restarting it)."""

from __future__ import annotations

import torch


class PeerStopped(RuntimeError):
    """Another rank met a deterministic error (and records it): this rank stops with it."""


def stop_together(problem: BaseException | None, device: torch.device) -> None:
    """Where the ranks decide together whether the run stops on a deterministic error:
    raises ``problem`` on a rank that has one, ``PeerStopped`` on the others when any rank
    has one, and returns when none has.

    Every rank calls it at the same point of a step: one all-reduce of one flag, only when
    torch.distributed is initialised with more than one rank. Why: DDP's ranks meet in
    collectives (the buffer broadcast of the forward pass, the gradient all-reduce of the
    backward pass); a rank that stopped alone would leave its peers blocked there. And a
    rank must not raise out of the train function, or Ray restarts the worker group into
    the same error: a stopped rank returns normally (``train.loop.ray_train_worker``).
    """
    failing = int(problem is not None)
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        flag = torch.tensor([failing], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag)
        failing = int(flag.item())
    raise_if_stopped(problem, failing)


def raise_if_stopped(problem: BaseException | None, failing_ranks: int) -> None:
    """After the ranks counted how many of them met a deterministic error: raise this
    rank's ``problem``, or ``PeerStopped`` when only others met one."""
    if problem is not None:
        raise problem
    if failing_ranks > 0:
        raise PeerStopped(f"{failing_ranks} other rank(s) stopped on a deterministic error")
