"""The ViT recipe end to end on the CPU: a tiny ViT trains with M = 5 and RAF from
configs/vit_b_paper.yaml, resumes exactly, and its optimiser decays the lr layer-wise."""
import pytest
import torch
from conftest import REPO, tiny_overrides

from raytrain.config import ConfigError, load_config
from raytrain.model import build_model
from raytrain.train.loop import run_loop
from raytrain.train.optim import build_optimizer
from raytrain.train.session import BareSession

VIT_B = str(REPO / "configs" / "vit_b_paper.yaml")


def _tiny_vit(train, val, run_dir, steps):
    return load_config(VIT_B, tiny_overrides(train, val, run_dir, **{
        "data.mixture": "[]", "model.backbone": "vit_tiny", "optim.amp": "none", "ray.use_gpu": "false",
        "ray.num_workers": 1, "optim.max_steps": steps, "optim.warmup_steps": 2,
        "optim.lr_schedule": "none"}))  # a cosine over optim.max_steps would differ between 3 and 6


def test_tiny_vit_trains_with_raf_and_resumes_exactly(synthetic_shards, tmp_path):
    train, val = synthetic_shards
    cfg = _tiny_vit(train, val, tmp_path / "a", 6)
    assert (cfg.rois.num_rois, cfg.model.fusion, cfg.model.dropout) == (5, "raf", 0.5)
    assert (cfg.optim.optimizer, cfg.optim.layer_decay) == ("adamw", 0.75)
    start = build_model(cfg.model).state_dict()
    whole = BareSession(str(tmp_path / "a"), device="cpu")
    metrics = run_loop(cfg, whole)
    assert metrics, "validation ran"
    trained = whole.model.state_dict()
    moved = [k for k in start if k.startswith("encoder.net.blocks.") and not torch.equal(start[k], trained[k])]
    assert len(moved) > 100  # the ViT's blocks train, not only the heads
    first = BareSession(str(tmp_path / "b"), device="cpu")
    run_loop(_tiny_vit(train, val, tmp_path / "b", 3), first)
    rest = BareSession(str(tmp_path / "b"), device="cpu")
    run_loop(_tiny_vit(train, val, tmp_path / "b", 6), rest)
    resumed = rest.model.state_dict()
    assert resumed.keys() == trained.keys()
    different = [k for k in trained if not torch.equal(trained[k], resumed[k])]
    assert not different, different[:5]


def test_layer_decay_scales_the_vit_blocks_lr():
    cfg = load_config(VIT_B, ["data.mixture=[]", "data.train_shards=x", "model.backbone=vit_tiny"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(cfg.optim, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    lr, wd = {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            lr[param], wd[param] = group["lr"], group["weight_decay"]
    named = dict(model.named_parameters())
    assert len(lr) == len(named)  # every parameter in exactly one group
    x, base = 0.75, 1e-4
    expected = {"encoder.net.patch_embed.proj.weight": base * x ** 13, "encoder.net.pos_embed": base * x ** 13,
                "encoder.net.blocks.0.attn.qkv.weight": base * x ** 12,
                "encoder.net.blocks.11.mlp.fc2.weight": base * x, "encoder.net.norm.weight": base}
    expected.update({k: base for k in named if k.startswith(("fusion.", "mesh_decoder.", "cam_decoder.", "proj."))})
    for name, value in expected.items():
        assert lr[named[name]] == pytest.approx(value), name
    assert wd[named["encoder.net.blocks.0.attn.qkv.weight"]] == 0.1
    for name in ("encoder.net.pos_embed", "encoder.net.blocks.0.attn.qkv.bias", "encoder.net.norm.weight"):
        assert wd[named[name]] == 0.0, name  # AdamW: no decay on embeddings, biases, norms
    # The paper's recipe keeps its single Adam group (its checkpoints' optimiser state loads).
    paper = load_config(None, ["model.backbone=resnet10t"])
    optimizer = build_optimizer(paper.optim, build_model(paper.model))
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1


def test_vit_configs_validate_and_need_whole_patches():
    for name, backbone in (("vit_b_paper", "vit_base"), ("vit_h_paper", "vit_huge")):
        cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
        assert cfg.model.backbone == backbone and cfg.optim.optimizer == "adamw" and cfg.optim.layer_decay < 1
        assert cfg.data.crop_size % 16 == 0 and cfg.name == name
    with pytest.raises(ConfigError, match=r"^data.crop_size: 200 is not a multiple of vit_base's 16-pixel patch"):
        load_config(VIT_B, ["data.crop_size=200"])
    with pytest.raises(ConfigError, match=r"^optim.layer_decay: 0.75 applies to the ViT backbones"):
        load_config(VIT_B, ["model.backbone=resnet50"])
    with pytest.raises(ConfigError, match=r"^optim.layer_decay: 0.0 must be above 0"):
        load_config(VIT_B, ["optim.layer_decay=0"])
    with pytest.raises(ConfigError, match=r"^model.pretrained=imagenet is not offered for vit_base: set "
                                          r"model.backbone_checkpoint"):
        load_config(VIT_B, ["model.pretrained=imagenet"])
