"""What `raytrain predict` is told: one dataclass, whose fields are the command's flags.

``add_arguments(parser)`` declares a flag per field (``--box-scale`` for ``box_scale``;
help, choices and defaults from the field) and ``PredictOptions.from_args(args)`` reads
them back, so a flag exists once. Fields without ``help`` (``storage_options``,
``quiet``) are for callers of the library.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields

from ..config import ConfigError
from ..outputs import check_output

#: Square box side = this x the larger side of the detection (the training data's convention).
BOX_SCALE = 1.2


def _flag(help_text: str, default=None, **argparse_kwargs):
    return field(default=default, metadata={"help": help_text, **argparse_kwargs})


@dataclass
class PredictOptions:
    """Everything `raytrain predict` is told (the CLI flags of the same names)."""
    inputs: list[str] = field(metadata={"help": "image/video files, folders, glob patterns, s3:// or gs:// "
                                                "prefixes", "nargs": "+"})
    checkpoint: str | None = _flag("a checkpoint directory (local, s3:// or gs://)")
    experiment: str | None = _flag("a train or tune experiment directory: its latest checkpoint, or with "
                                   "--best the one of lowest val_mpjpe (as `raytrain eval`)")
    best: bool = _flag("with --experiment: the checkpoint of lowest stored val_mpjpe", False)
    out: str = _flag("output directory (refused when not empty, unless --overwrite)", "runs/predict")
    overwrite: bool = _flag("replace what a previous run wrote in --out (render/ and vertices/ included)",
                            False)
    detections: str | None = _flag("COCO-results JSON of person boxes, keyed by file_name (relative to "
                                   "the input) or image_id (the file's name or stem)")
    detector: str | None = _flag("a torchvision detector's state_dict file (local)")
    detector_arch: str = _flag("its torchvision builder", "fasterrcnn_resnet50_fpn_v2")
    score_threshold: float = _flag("boxes (of the detector or the detections file) at or above this score",
                                   0.5, type=float)
    focal: float | None = _flag("focal length in px (default: the image diagonal)", type=float)
    box_scale: float = _flag("square box side = this x the larger box side", BOX_SCALE, type=float)
    batch_size: int = _flag("persons per forward pass (and per crop batch: memory does not grow with "
                            "the boxes of a picture)", 16, type=int)
    render: bool = _flag("draw the meshes: render/<image>.jpg, render/<video>.mp4", False)
    save_vertices: bool = _flag("vertices/*.npz (camera frame)", False)
    every: int = _flag("videos: predict every K-th frame (frames 0, K, 2K, ...)", 1, type=int)
    max_frames: int = _flag("videos: predict at most this many frames each (0: all)", 0, type=int)
    device: str | None = _flag("cpu, cuda, cuda:1 (default: cuda when present)")
    config: str | None = _flag("config YAML to use instead of the checkpoint's own")
    smpl_dir: str | None = _flag("SMPL files (default: --config's model.smpl_dir, else the synthetic body "
                                 "model; never the checkpoint's)")
    # Ray Data (``ray.py``)
    ray: bool = _flag("batch inference on Ray Data (the running cluster)", False)
    ray_format: str = _flag("--ray: predictions.jsonl or a predictions.parquet/ folder", "jsonl",
                            choices=("jsonl", "parquet"))
    actors: int = _flag("--ray: model actors (one GPU each on GPU nodes)", 2, type=int)
    actor_cpus: float = _flag("--ray: CPUs per CPU model actor", 1.0, type=float)
    crop_cpus: float = _flag("--ray: CPUs per read+crop task", 0.5, type=float)
    storage_options: dict | None = None
    quiet: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PredictOptions:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check(self) -> None:
        """ConfigError naming the flag, before anything is loaded."""
        if not self.inputs:
            raise ConfigError("predict: give at least one image, video, folder, glob or URL prefix")
        if bool(self.checkpoint) == bool(self.experiment):
            raise ConfigError("predict: give exactly one of --checkpoint PATH or --experiment DIR")
        if self.best and not self.experiment:
            raise ConfigError("predict: --best goes with --experiment DIR")
        if bool(self.detections) == bool(self.detector):
            raise ConfigError("predict: give exactly one of --detections FILE (COCO results) or "
                              "--detector STATE_DICT (a local torchvision detector)")
        if self.batch_size < 1:
            raise ConfigError(f"predict: --batch-size must be at least 1, got {self.batch_size}")
        if self.every < 1:
            raise ConfigError(f"predict: --every must be at least 1, got {self.every}")
        if self.max_frames < 0:
            raise ConfigError(f"predict: --max-frames must be 0 (all) or more, got {self.max_frames}")
        if self.focal is not None and not (math.isfinite(self.focal) and self.focal > 0):
            raise ConfigError(f"predict: --focal must be a positive number of pixels, got {self.focal}")
        if not (math.isfinite(self.box_scale) and self.box_scale > 0):
            raise ConfigError(f"predict: --box-scale must be positive, got {self.box_scale}")
        if not 0 <= self.score_threshold <= 1:
            raise ConfigError(f"predict: --score-threshold must be in [0, 1], got {self.score_threshold}")
        if self.ray_format not in ("jsonl", "parquet"):
            raise ConfigError(f"predict: --ray-format must be jsonl or parquet, got {self.ray_format!r}")
        if self.ray and self.ray_format == "parquet" and (self.render or self.save_vertices):
            raise ConfigError("predict: --render and --save-vertices need --ray-format jsonl")
        if self.actors < 1 or self.actor_cpus < 0 or self.crop_cpus <= 0:
            raise ConfigError("predict: --actors must be >= 1, --actor-cpus >= 0, --crop-cpus > 0")
        check_output(self.out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per documented field of ``PredictOptions``."""
    for f in fields(PredictOptions):
        meta = dict(f.metadata)
        if "help" not in meta:
            continue
        if f.name == "inputs":
            parser.add_argument("inputs", **meta)
            continue
        default = None if f.default is MISSING else f.default
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", **meta)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", default=default, **meta)
