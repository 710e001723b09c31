"""The multi-RoI network (docs/method.md §3): encoder -> fusion -> D_mesh(ū), D_cam(u_m), P(h_m).

    images (N,M,3,S,S) ─E (one batch of N·M crops)─▶ h (N,M,d)
    boxes ─bbox_info (float64)─▶ γ(B) (N,M,P) ─┐
    h ──────────────────────────────────────────┴─ fusion ─▶ u (N,M,d), w (N,M,M)
    ū = mean_m u_m ─D_mesh─▶ θ (N,24,6) -> rotmats, β (N,10) ─body model─▶ vertices, joints
    u_m ─D_cam─▶ C_m (N,M,3) ─cam_crop_to_full─▶ (tx,ty,tz) (N,M,3)
    h_m ─P─▶ z (N,M,D)

With `bbox_info_to_decoders`, D_cam sees u_m ⊕ bbox_info(B_m) and D_mesh sees
ū ⊕ mean_m bbox_info(B_m) (the mean keeps θ, β invariant to the RoI order), as CLIFF
feeds its box descriptor to the regressor.
"""
from dataclasses import fields, replace

import torch
import torch.nn as nn

from raytrain.config import ModelConfig
from raytrain.geometry import cam_crop_to_full, rot6d_to_rotmat, rotmat_to_rot6d

from .backbones import create_backbone
from .decoders import CameraDecoder, MeshDecoder, ProjectionHead
from .encoding import box_encoding, encoding_dim
from .fusion import create_fusion

Tensor = torch.Tensor

CAM_INITS = ("consistent", "mean")  # D_cam's start: one shared full camera, or SPIN's mean
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_mean_params() -> dict[str, Tensor]:
    """A neutral start when no SMPL mean is given: identity rotations, zero betas, s = 0.9.

    Training should pass `raytrain.body.load_mean_params(...)` instead (SPIN/CLIFF start from
    the SMPL mean pose, whose global orientation faces the camera upright).
    """
    pose = rotmat_to_rot6d(torch.eye(3).expand(24, 3, 3)).flatten()  # (144,)
    return {"pose": pose, "shape": torch.zeros(10), "cam": torch.tensor([0.9, 0.0, 0.0])}


def normalize_images(images: Tensor) -> Tensor:
    """uint8 (..., 3, S, S) in [0, 255] -> float32 with ImageNet mean/std, on images' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class MultiRoINet(nn.Module):
    def __init__(self, cfg: ModelConfig, body_model: nn.Module | None = None,
                 mean_params: dict[str, Tensor] | None = None):
        super().__init__()
        self.cfg = cfg
        mean = mean_params if mean_params is not None else default_mean_params()
        mean = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in mean.items()}
        if cfg.cam_init not in CAM_INITS:
            raise ValueError(f"unknown cam_init {cfg.cam_init!r}: one of {', '.join(CAM_INITS)}")
        self.encoder, d = create_backbone(cfg.backbone, cfg.backbone_checkpoint, pretrained=cfg.pretrained,
                                          partial_ok=cfg.backbone_partial_ok)
        self.feature_dim = d
        pe_dim = encoding_dim(cfg.pe_bands)
        self.fusion = create_fusion(cfg.fusion, d, pe_dim, hidden=cfg.fusion_hidden,
                                    heads=cfg.attention_heads)
        extra = 3 if cfg.bbox_info_to_decoders else 0
        dec = dict(hidden=cfg.decoder_hidden, iters=cfg.decoder_iters, dropout=cfg.dropout)
        self.mesh_decoder = MeshDecoder(d + extra, mean["pose"], mean["shape"], **dec)
        self.cam_decoder = CameraDecoder(d + extra, mean["cam"], **dec)
        self.proj = ProjectionHead(d, cfg.proj_dim, cfg.proj_hidden)
        self._body = None
        self.set_body_model(body_model)

    # The body model (SMPL) is kept out of the module tree: its tensors are constants of the
    # chosen body, not weights, so they stay out of state_dict (a checkpoint trained with the
    # synthetic body must not overwrite real SMPL tensors on load), out of parameters() and
    # out of DDP's buffer broadcast. It still follows .to(device) / .double() via _apply.
    @property
    def body_model(self) -> nn.Module | None:
        return self._body

    def set_body_model(self, body_model: nn.Module | None) -> None:
        if body_model is not None:
            body_model.requires_grad_(False)
            param = next(self.parameters())
            body_model.to(param.device)
        object.__setattr__(self, "_body", body_model)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._body is not None:
            self._body._apply(fn)
        return self

    def encode(self, images: Tensor) -> Tensor:
        """(N,M,3,S,S) -> h (N,M,d): the encoder runs once over all N·M crops."""
        N, M = images.shape[:2]
        return self.encoder(images.flatten(0, 1)).view(N, M, -1)

    def forward(self, images: Tensor, boxes: Tensor, image_size: Tensor, focal: Tensor) -> dict[str, Tensor]:
        """images (N,M,3,S,S) normalised float, boxes (N,M,3) px, image_size (N,2) (W,H), focal (N,)."""
        N, M = images.shape[:2]
        h = self.encode(images)                                              # (N,M,d)
        # float64 inside; handed over in the parameters' dtype (float32 under autocast)
        pe, info = box_encoding(boxes, image_size, focal, self.cfg.pe_bands, dtype=self.cam_decoder.mean.dtype)
        u, w = self.fusion(h, pe)                                            # (N,M,d), (N,M,M)
        mesh_in, cam_in = u.mean(dim=1), u                                   # ū (N,d), u (N,M,d)
        if self.cfg.bbox_info_to_decoders:
            mesh_in = torch.cat([mesh_in, info.mean(dim=1)], dim=-1)         # (N,d+3)
            cam_in = torch.cat([cam_in, info], dim=-1)                       # (N,M,d+3)
        pose_6d, betas = self.mesh_decoder(mesh_in)                          # (N,24,6), (N,10)
        cam_start = None
        if self.cfg.cam_init == "consistent":
            cam_start = self.cam_decoder.consistent_start(boxes, image_size, focal)
        cam = self.cam_decoder(cam_in, cam_start)                            # (N,M,3) (s,tx,ty)
        out = {
            "pose_6d": pose_6d,
            "pose_rotmat": rot6d_to_rotmat(pose_6d),                         # (N,24,3,3)
            "betas": betas,
            "cam_crop": cam,
            "cam_full": cam_crop_to_full(cam, boxes.to(cam.dtype), image_size[:, None].expand(N, M, 2),
                                         focal[:, None].expand(N, M)),      # (N,M,3) (tx,ty,tz)
            "z": _at_least_float32(self.proj(h)),                           # (N,M,D), unnormalised
            "h": h,
            "u": u,
            "fusion_weights": w,
        }
        if self.body_model is not None:
            body = self.body_model(out["pose_rotmat"], betas)
            out.update(vertices=body.vertices, joints=body.joints_j24,     # (N,6890,3), (N,24,3) J24
                       joints_h36m=body.joints_h36m, joints_smpl=body.joints_smpl)
        return out


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16/fp16 (autocast) -> float32; float32/float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def build_model(cfg=None, body_model: nn.Module | None = None,
                mean_params: dict[str, Tensor] | None = None, **overrides) -> MultiRoINet:
    """Build the network from a ModelConfig (or any object with its attribute names; None for
    the defaults), keyword settings overriding it. `mean_params`: {"pose": (144,) 6D,
    "shape": (10,), "cam": (3,)}, e.g. raytrain.body.load_mean_params(); None ->
    default_mean_params().
    """
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if hasattr(cfg, f.name)})
    return MultiRoINet(replace(cfg, **overrides), body_model, mean_params)
