"""Distributed training on Ray Train: the loop, checkpoints, the launcher."""
from .checkpoint import (
                         is_complete,
                         latest_complete_checkpoint,
                         list_complete_checkpoints,
                         load_checkpoint,
                         save_checkpoint,
)
