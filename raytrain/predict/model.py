"""The trained network for inference: checkpoint -> config -> model -> per-person outputs.

    model = load_inference_model("runs/.../checkpoint_000003", smpl_dir=...)
    outputs = model(batch)   # batch of PersonCropper items -> numpy pose, betas, cam_full, ...

Checkpoint, config and network come from ``checkpoints`` as `raytrain eval` gets them
(``checkpoint_target``: the config stored in the checkpoint, the Ray trial's params.json,
a YAML beside it, or ``config``; ``load_trained_model``: the network without its
training-only inputs, the weights checked); the forward pass is
``eval.protocol.predict``, the function validation runs. The body model is never taken
from a stored config (a downloaded checkpoint must not choose files to read).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoints import CheckpointMismatch, check_weights  # noqa: F401 - part of this module's API
from ..config import ConfigError, ExperimentConfig


@dataclass
class InferenceModel:
    """A loaded network plus what inference needs to know about its training."""
    model: torch.nn.Module
    cfg: ExperimentConfig
    checkpoint: str
    config_source: str
    device: torch.device
    faces: np.ndarray

    @property
    def num_rois(self) -> int:
        return int(self.cfg.rois.num_rois)

    @property
    def crop_size(self) -> int:
        return int(self.cfg.data.crop_size)

    @torch.no_grad()
    def __call__(self, items: list[dict], vertices: bool = False) -> dict[str, np.ndarray]:
        """PersonCropper items -> pose (N, 72) axis-angle, betas (N, 10), cam_full (N, 3)
        of RoI 0 (m), joints_2d (N, 24, 2) full-image px, focal (N,), and with
        ``vertices`` the body-frame vertices (N, V, 3) (add cam_full for the camera frame)."""
        return self.forward_arrays(stack_items(items), vertices=vertices)

    @torch.no_grad()
    def forward_arrays(self, arrays: dict[str, np.ndarray], vertices: bool = False) -> dict[str, np.ndarray]:
        """images (N, M, S, S, 3) uint8, boxes (N, M, 3), image_size (N, 2), focal (N,)."""
        from ..eval.protocol import predict
        from ..geometry import perspective_projection, rotmat_to_axis_angle
        batch = {"images": torch.from_numpy(np.ascontiguousarray(arrays["images"])).permute(0, 1, 4, 2, 3),
                 "boxes": torch.as_tensor(arrays["boxes"], dtype=torch.float32),
                 "image_size": torch.as_tensor(arrays["image_size"], dtype=torch.float32),
                 "focal": torch.as_tensor(arrays["focal"], dtype=torch.float32)}
        out = predict(self.model, batch, self.device)
        n = batch["images"].shape[0]
        cam_full = out["cam_full"][:, 0]                                         # (N, 3) RoI 0
        joints_2d = perspective_projection(out["joints"], cam_full, batch["focal"].to(self.device),
                                           batch["image_size"].to(self.device))
        result = {"pose": rotmat_to_axis_angle(out["pose_rotmat"].reshape(-1, 3, 3)).reshape(n, 72),
                  "betas": out["betas"], "cam_full": cam_full, "joints_2d": joints_2d,
                  "focal": batch["focal"]}
        if vertices:
            result["vertices"] = out["vertices"]
        return {k: v.detach().float().cpu().numpy() for k, v in result.items()}


def stack_items(items: list[dict]) -> dict[str, np.ndarray]:
    """PersonCropper items -> the arrays of one batch."""
    return {"images": np.stack([item["images"] for item in items]),
            "boxes": np.stack([item["boxes"] for item in items]).astype(np.float32),
            "image_size": np.stack([item["image_size"] for item in items]).astype(np.float32),
            "focal": np.asarray([item["focal"] for item in items], np.float32)}


def load_inference_model(checkpoint, smpl_dir: str, config: str | None = None,
                         device: str | None = None) -> InferenceModel:
    """Load a checkpoint directory (a path or URL, or a ``checkpoints.Target`` already
    opened) for inference (eval mode, on ``device``).

    Raises ``CheckpointError`` for a path that is no complete checkpoint and
    ``CheckpointMismatch`` (a ``ConfigError``) when its weights do not fit its config."""
    from ..body import load_body_model
    from ..checkpoints import Target, checkpoint_target, load_trained_model
    if smpl_dir is None:
        raise ConfigError("predict: the body model directory (model.smpl_dir) is not set")
    target = checkpoint if isinstance(checkpoint, Target) else checkpoint_target(checkpoint, config)
    body = load_body_model(smpl_dir)
    model = load_trained_model(target, device, body_model=body)
    return InferenceModel(model=model, cfg=target.config, checkpoint=target.origin,
                          config_source=target.config_source, device=next(model.parameters()).device,
                          faces=np.asarray(body.faces))
