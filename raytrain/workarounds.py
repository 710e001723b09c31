"""Workarounds for what torch and Ray offer no public API for. The only module that touches
their private attributes: re-check each on every upgrade of the pins (torch==2.14.1,
ray==2.60.0) and delete it once upstream has the public way.

**torch: a tensor allocated in shared memory** (`new_shared_tensor`). A DataLoader worker
hands its batch's crops to the training process in shared memory. `Tensor.share_memory_()`
allocates private memory first and copies it (12.3 ms for a 12 MB batch here, against
6.9 ms allocated in place; BENCHMARKS.md "Batch buffers"); torch's own `default_collate`
allocates in place through the private `_new_shared`, which is what this does.
Upstream: pytorch/pytorch#48558 ("tensor ctors should support directly creating in
shared memory", open).

**Ray: release the placement group of a trial that Tune stopped.**

When ASHA stops a trial (or the trial fails), Tune kills the trial's actor; the Train
controller it owns dies with it, before removing its workers' placement group. Ray 2.60's
detached PlacementGroupCleaner should then remove it, but it polls the state API, which
fails without the dashboard or with several Ray instances on one machine, so the group
leaks and the next trials wait for CPUs forever. The trial therefore records its group's
id in Ray's internal KV, and a driver-side Tune callback removes it when the trial ends.

Upstream: ray-project/ray#62753 (the cleaner can orphan a group when its controller dies)
and ray-project/ray#65447 (the cleaner's state-API queries fail and it skips the
controller: "Failed to query Ray Train Controller actor state"). It uses Ray internals
(`ray.train.v2._internal`, the worker group's state, `ray._raylet`,
`ray.experimental.internal_kv`).
"""
import logging

import torch

log = logging.getLogger(__name__)

_KV_NAMESPACE = "raytrain_tune"


def placement_group_recorder(trial_id: str):
    try:
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:                          # not Train V2: nothing to do
        return None

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group):
            try:
                from ray.experimental import internal_kv
                pg = worker_group._worker_group_state.placement_group_handle.placement_group
                internal_kv._internal_kv_put(f"pg/{trial_id}", pg.id.hex(), overwrite=True,
                                             namespace=_KV_NAMESPACE)
            except Exception as err:             # noqa: BLE001 - best effort, never fail training
                log.warning("could not record the placement group of %s: %s", trial_id, err)

    return RecordPlacementGroup()


def release_trial_placement_group(trial_id: str) -> bool:
    """Remove the trial's Train placement group if it is still there; True if it was."""
    from ray._raylet import PlacementGroupID
    from ray.experimental import internal_kv
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
    key = f"pg/{trial_id}"
    value = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    if not value:
        return False
    internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)
    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(value.decode())))
    state = placement_group_table(pg).get("state")
    if state in (None, "REMOVED"):
        return False
    remove_placement_group(pg)
    return True


def release_callback():
    from ray import tune

    class ReleaseTrialResources(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

        @staticmethod
        def _release(trial):
            try:
                if release_trial_placement_group(trial.trial_id):
                    log.debug("released the workers of stopped trial %s", trial.trial_id)
            except Exception as err:             # noqa: BLE001 - never break the experiment loop
                log.warning("could not release trial %s's workers: %s", trial.trial_id, err)

    return ReleaseTrialResources()


def new_shared_tensor(shape, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialised tensor of `shape` allocated directly in shared memory (what
    `torch.utils.data.default_collate` does in a worker), without the copy of
    `share_memory_()`."""
    numel = 1
    for side in shape:
        numel *= int(side)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(tuple(shape))
