"""Checkpoints: the format (`format`), what training saves and restores (`manager`), which
checkpoint (`select`: opening, ranking, resuming), object storage (`remote`) and the
trained network they hold (`trained`: `load_trained_model`)."""
from .format import (
    COMMIT_FILE,
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    IncompleteCheckpoint,
    read_commit,
    save_checkpoint,
    verify_local,
)
from .manager import CheckpointManager, Position, local_copy_dir, remove_orphaned_copies
from .remote import fetch_checkpoint, storage_errors
from .select import Candidate, candidates, choose_resume, latest_checkpoint, open_checkpoint, rank
from .trained import (
    MODEL_KEYS,
    CheckpointMismatch,
    Target,
    check_weights,
    checkpoint_target,
    load_trained_model,
    select_checkpoints,
    target_of,
    trained_network,
)

__all__ = [
    "COMMIT_FILE", "STATE_FILE", "Checkpoint", "CheckpointError", "IncompleteCheckpoint", "read_commit",
    "save_checkpoint", "verify_local", "CheckpointManager", "Position", "local_copy_dir",
    "remove_orphaned_copies", "fetch_checkpoint", "storage_errors", "Candidate", "candidates",
    "choose_resume", "latest_checkpoint", "open_checkpoint", "rank", "MODEL_KEYS", "CheckpointMismatch",
    "Target", "check_weights", "checkpoint_target", "load_trained_model", "select_checkpoints",
    "target_of", "trained_network",
]
