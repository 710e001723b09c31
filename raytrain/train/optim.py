"""The optimiser of a run: Adam as the paper trains, or AdamW with layer-wise lr decay for ViTs.

    optimizer = build_optimizer(cfg.optim, model)

`optim.optimizer=adam` with `optim.layer_decay=1` is one parameter group (the paper's
recipe). Otherwise parameters are grouped by lr scale and weight decay: with `adamw`,
biases, norms and position embeddings get no weight decay (as in MAE, ViTPose, timm); with
`layer_decay` x < 1, the ViT encoder's parameters at depth k of L + 1 (its `layer_id`)
train at lr * x^(L + 1 - k). The lr schedule multiplies every group's lr alike.
"""
import torch
import torch.nn as nn

from ..config import OptimConfig

#: Parameters that are embeddings rather than weights: no weight decay under AdamW.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    module = model.module if hasattr(model, "module") else model  # DDP: the same parameters
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    common = dict(lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adam" and cfg.layer_decay == 1:
        return kind(module.parameters(), weight_decay=cfg.weight_decay, **common)
    return kind(param_groups(cfg, module), **common)


def param_groups(cfg: OptimConfig, module: nn.Module) -> list[dict]:
    """[{params, lr, weight_decay}] in the order the parameters first appear."""
    encoder = getattr(module, "encoder", None)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        scale = lr_scale(cfg.layer_decay, encoder, name)
        decay = cfg.weight_decay
        if cfg.optimizer == "adamw" and (param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES):
            decay = 0.0
        group = groups.setdefault((scale, decay), {"params": [], "lr": cfg.lr * scale, "weight_decay": decay})
        group["params"].append(param)
    return list(groups.values())


def lr_scale(layer_decay: float, encoder: nn.Module | None, name: str) -> float:
    """lr factor of parameter `name` (of the network): layer_decay^(L + 1 - depth) inside a
    ViT encoder, 1 elsewhere."""
    prefix = "encoder.net."
    if layer_decay == 1 or not hasattr(encoder, "layer_id") or not name.startswith(prefix):
        return 1.0
    depth = encoder.layer_id(name[len(prefix):])
    return layer_decay ** (encoder.num_layers + 1 - depth)
