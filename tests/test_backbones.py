"""Pose-pretrained and ImageNet backbone files in the layouts people have, built from the
real timm / torchvision models (small flavours) and renamed into each layout."""
import json
import logging
import os
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from conftest import REPO
from safetensors.torch import save_file

from raytrain.config import ConfigError, load_config
from raytrain.model import create_backbone
from raytrain.model.backbones import BackboneLoadError, match_state


def _counted(state):
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _assert_loaded(module, state, keys):
    own = module.weights_target().state_dict()
    for key in keys:
        assert torch.equal(own[key], state[key]), key


def _pose_hrnet_state(seed=3):
    """The HRNet pose repository's layout (pose_hrnet.py): the stem, layer1, transitions and
    stages of the classification net, the last stage-4 module fusing into branch 0 only
    (multi_scale_output=False), and the 1x1 joint head `final_layer`."""
    torch.manual_seed(seed)
    net = timm.create_model("hrnet_w18_small", pretrained=False)
    heads = ("incre_modules", "downsamp_modules", "final_layer", "classifier")
    state = {k: v for k, v in net.state_dict().items()
             if not k.startswith(heads) and not k.startswith(("stage4.0.fuse_layers.1",
                                                               "stage4.0.fuse_layers.2",
                                                               "stage4.0.fuse_layers.3"))}
    state["final_layer.weight"] = torch.randn(17, 16, 1, 1)
    state["final_layer.bias"] = torch.zeros(17)
    return state


@pytest.fixture
def summaries(caplog):
    """The backbone loader's summary lines since the last call ("warning: " before warnings)."""
    caplog.set_level(logging.INFO, logger="raytrain.model.backbones")

    def read() -> str:
        lines = [("warning: " if r.levelno >= logging.WARNING else "") + r.getMessage()
                 for r in caplog.records if r.name == "raytrain.model.backbones"]
        caplog.clear()
        return "\n".join(lines)
    return read


def test_hrnet_pose_layout(tmp_path, summaries):
    state = _pose_hrnet_state()
    path = tmp_path / "pose_hrnet_w18_small_256x192.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # model_best.pth form
    module, dim = create_backbone("hrnet_w18_small", str(path))
    assert dim == 16 + 32 + 64 + 128
    report = match_state(module.weights_target().state_dict(), state, str(path))
    assert report.unused == ["final_layer.weight", "final_layer.bias"]
    # The pose net's last module fuses into branch 0 only: timm's fusion into branches 1-3
    # has no counterpart in the file. Named on the summary line, not held against the file.
    assert report.missing == [] and report.mismatched == []
    assert len(report.layout_gap) == 65 and all(k.startswith("stage4.0.fuse_layers.") for k in report.layout_gap)
    assert len(report.matched) == report.total - 65 and report.fraction == 1.0
    _assert_loaded(module, state, report.matched)
    line = summaries()
    assert line.startswith("[raytrain] backbone hrnet_w18_small: loaded 290/355 tensors (100.0% of the "
                           "290 its layout has: 65 stage-4 fusion tensors into branches 1-3")
    assert "file tensors not used: final_layer (2" in line and "warning" not in line
    # A file missing more than that gap is judged on the rest.
    del state["stage2.0.branches.0.0.conv1.weight"]
    torch.save(state, path)
    create_backbone("hrnet_w18_small", str(path))
    assert "left at init: stage2 (1, e.g. stage2.0.branches.0.0.conv1.weight)" in summaries()


def test_simplebaseline_and_torchvision_layouts_load_fully(tmp_path, summaries):
    torch.manual_seed(4)
    torchvision_state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision_state, path)
    module, _ = create_backbone("resnet18", str(path))
    _assert_loaded(module, torchvision_state, [k for k in module.weights_target().state_dict()
                                               if not k.endswith("num_batches_tracked")])
    line = summaries()
    assert "loaded 100/100 tensors (100.0%)" in line and "file tensors not used: fc (2" in line
    assert "warning" not in line

    # SimpleBaseline (pose_resnet): torchvision names, no num_batches_tracked (saved by torch
    # 0.4), plus the deconvolution head and the joint layer.
    pose = {k: v for k, v in _counted(torchvision_state).items() if not k.startswith("fc.")}
    pose.update({"deconv_layers.0.weight": torch.randn(512, 256, 4, 4),
                 "deconv_layers.1.weight": torch.ones(256), "final_layer.weight": torch.randn(17, 256, 1, 1)})
    path = tmp_path / "pose_resnet_18_256x192.pth"
    torch.save(pose, path)
    module, _ = create_backbone("resnet18", str(path))
    _assert_loaded(module, pose, [k for k in pose if not k.startswith(("deconv", "final"))])
    line = summaries()
    assert "loaded 100/100" in line and "deconv_layers (2" in line and "warning" not in line


def test_timm_safetensors_file_and_98_percent(tmp_path, summaries):
    torch.manual_seed(5)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    create_backbone("resnet18", str(path))
    assert "loaded 100/100" in summaries()
    # >= 98 % of the tensors: loads with a warning-free summary naming the two left at init
    partial = {k: v for k, v in state.items() if k not in ("layer4.1.bn2.weight", "layer4.1.bn2.bias")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    module, _ = create_backbone("resnet18", str(path))
    line = summaries()
    assert line.startswith("[raytrain] backbone resnet18: loaded 98/100 tensors (98.0%)")
    assert "left at init: layer4 (2, e.g. layer4.1.bn2.weight)" in line and "warning" not in line


def test_half_matching_file_is_refused_unless_asked(tmp_path, summaries):
    torch.manual_seed(6)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    half = {k: v for k, v in state.items() if not k.startswith(("layer3", "layer4"))}
    half["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)  # right name, wrong shape
    path = tmp_path / "half.pth"
    torch.save(half, path)
    with pytest.raises(BackboneLoadError) as refused:
        create_backbone("resnet18", str(path))
    message = str(refused.value)
    assert "matches only 50/100 tensors (50%)" in message
    assert "left at init: layer3 (" in message and "layer4 (" in message
    assert "shape" not in message or "layer3.0.conv1.weight" in message
    assert "model.backbone_partial_ok=true" in message and "\n" not in message
    summaries()
    create_backbone("resnet18", str(path), partial_ok=True)
    assert summaries().startswith("warning: [raytrain] backbone resnet18: loaded 50/100")


def test_pretrained_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained=imagenet and model.backbone_checkpoint"):
        load_config(None, ["model.pretrained=imagenet", f"model.backbone_checkpoint={tmp_path}/x.pth"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, ["model.pretrained=coco"])


_HUB_CHILD = """
import json, logging, sys, torch
from raytrain.model import create_backbone
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
module, dim = create_backbone("mobilenetv3_small_050", pretrained="imagenet")
expected = torch.load(sys.argv[1])
own = module.weights_target().state_dict()
print(json.dumps({"equal": all(torch.equal(own[k], v) for k, v in expected.items() if k in own),
                  "compared": sum(k in own for k in expected), "total": len(own)}))
"""


@pytest.mark.slow
def test_pretrained_imagenet_through_timm_hub_cache(tmp_path):
    """timm's own loading (hf_hub_download of model.safetensors) runs against a Hugging
    Face cache filled here, offline: the weights that come out are the cached file's."""
    torch.manual_seed(7)
    net = timm.create_model("mobilenetv3_small_050", pretrained=False)
    hub_id = net.pretrained_cfg["hf_hub_id"]  # timm/mobilenetv3_small_050.lamb_in1k
    repo = tmp_path / "hub" / ("models--" + hub_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(repo / "snapshots" / revision / "model.safetensors"))
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier")}, tmp_path / "expected.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", _HUB_CHILD, str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert f"ImageNet weights from timm ({hub_id})" in result.stdout
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["equal"] and outcome["compared"] == outcome["total"] > 100
    # An empty cache, offline: one clear line naming the way out.
    env["HF_HUB_CACHE"] = str(tmp_path / "empty")
    result = subprocess.run([sys.executable, "-c", _HUB_CHILD, str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode != 0
    assert "model.pretrained=imagenet: timm could not load ImageNet weights for mobilenetv3_small_050" in result.stderr
    assert "model.backbone_checkpoint" in result.stderr


def test_refused_checkpoint_stops_a_run_before_ray_starts(tmp_path):
    import ray

    from raytrain.train.launch import preflight_model
    torch.manual_seed(8)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith(("layer3", "layer4"))}, tmp_path / "half.pth")
    demo = str(REPO / "configs" / "demo.yaml")
    cfg = load_config(demo, ["model.backbone=resnet18", f"model.backbone_checkpoint={tmp_path / 'half.pth'}"])
    with pytest.raises(ConfigError, match=r"model.backbone_checkpoint: backbone checkpoint .*half.pth matches only "
                                          r"50/100 tensors"):
        preflight_model(cfg)
    with pytest.raises(ConfigError, match=r"model.backbone: 'resnet5' is not a registered backbone .*resnet50"):
        load_config(demo, ["model.backbone=resnet5"])
    assert not ray.is_initialized()


# ----------------------------------------------------------------------------- ViT layouts

def _vitpose_state(embed=192, depth=12, grid=(16, 12), seed=9):
    """ViTPose's layout (mmpose models/backbones/vit.py, also HMR 2.0's backbone): no class
    token, `pos_embed` (1, 1 + 16*12, C) for 256x192 crops whose first row its forward adds
    to every patch, the patch conv, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`
    and `last_norm`."""
    g = torch.Generator().manual_seed(seed)
    state = {"patch_embed.proj.weight": torch.randn(embed, 3, 16, 16, generator=g),
             "patch_embed.proj.bias": torch.randn(embed, generator=g),
             "pos_embed": torch.randn(1, 1 + grid[0] * grid[1], embed, generator=g)}
    for i in range(depth):
        for name, shape in (("norm1.weight", (embed,)), ("norm1.bias", (embed,)),
                            ("attn.qkv.weight", (3 * embed, embed)), ("attn.qkv.bias", (3 * embed,)),
                            ("attn.proj.weight", (embed, embed)), ("attn.proj.bias", (embed,)),
                            ("norm2.weight", (embed,)), ("norm2.bias", (embed,)),
                            ("mlp.fc1.weight", (4 * embed, embed)), ("mlp.fc1.bias", (4 * embed,)),
                            ("mlp.fc2.weight", (embed, 4 * embed)), ("mlp.fc2.bias", (embed,))):
            state[f"blocks.{i}.{name}"] = torch.randn(*shape, generator=g)
    state["last_norm.weight"] = torch.randn(embed, generator=g)
    state["last_norm.bias"] = torch.randn(embed, generator=g)
    return state


def _resized(patches, old, new=(14, 14)):
    """(1, h*w, C) rows on grid `old` resampled bicubically (antialiased) to `new`."""
    grid = patches.reshape(1, *old, -1).permute(0, 3, 1, 2)
    out = torch.nn.functional.interpolate(grid, size=new, mode="bicubic", antialias=True)
    return out.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)


def _assert_vitpose_loaded(module, state):
    own = module.weights_target().state_dict()
    for key, value in state.items():
        if key.startswith("blocks.") or key.startswith("patch_embed."):
            assert torch.equal(own[key], value), key
    assert torch.equal(own["norm.weight"], state["last_norm.weight"])
    pos = state["pos_embed"]
    torch.testing.assert_close(own["pos_embed"], _resized(pos[:, 1:] + pos[:, :1], (16, 12)))


def test_vitpose_layout_loads_every_tensor_with_position_embeddings_resized(tmp_path, summaries):
    state = _vitpose_state()
    head = {"keypoint_head.deconv_layers.0.weight": torch.randn(192, 256, 4, 4),
            "keypoint_head.final_layer.weight": torch.randn(17, 256, 1, 1),
            "keypoint_head.final_layer.bias": torch.zeros(17)}
    path = tmp_path / "vitpose_tiny_coco_256x192.pth"
    torch.save({"meta": {"epoch": 210, "mmpose_version": "0.24.0"},  # mmpose's checkpoint form
                "state_dict": {**{f"backbone.{k}": v for k, v in state.items()}, **head}}, path)
    module, dim = create_backbone("vit_tiny", str(path))
    assert dim == 192
    _assert_vitpose_loaded(module, state)
    line = summaries()
    assert "vitpose_tiny_coco_256x192.pth; position embeddings resized from 16x12 to 14x14;" in line
    assert "backbone vit_tiny: loaded 149/149 tensors (100.0%)" in line and "warning" not in line
    assert "file tensors not used: keypoint_head (3" in line
    # The RoI feature: the mean of the normed patch tokens, for any crop that is whole patches.
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        tokens = module.net.forward_features(x)                      # (2, 16, 192) after the norm
        torch.testing.assert_close(module.eval()(x), tokens.mean(dim=1))


def test_hmr2_checkpoint_backbone_loads_every_tensor(tmp_path, summaries):
    """HMR 2.0 / 4D-Humans: a Lightning checkpoint whose `state_dict` holds the ViTPose ViT
    under `backbone.`, next to its SMPL head, the SMPL layer's buffers and the discriminator."""
    state = _vitpose_state(seed=10)
    others = {"smpl_head.decpose.weight": torch.randn(138, 1024), "smpl_head.init_body_pose": torch.zeros(1, 138),
              "smpl.shapedirs": torch.randn(6890, 3, 10), "discriminator.D_conv1.weight": torch.randn(32, 9, 1, 1)}
    path = tmp_path / "epoch=35-step=1000000.ckpt"
    torch.save({"epoch": 35, "global_step": 1000000, "pytorch-lightning_version": "2.0.2",
                "state_dict": {**{f"backbone.{k}": v for k, v in state.items()}, **others},
                "hyper_parameters": {"cfg": {"MODEL": {"IMAGE_SIZE": 256}}}}, path)
    module, _ = create_backbone("vit_tiny", str(path))
    _assert_vitpose_loaded(module, state)
    line = summaries()
    assert "loaded 149/149 tensors (100.0%)" in line
    assert all(f"{top} (" in line for top in ("smpl_head", "smpl", "discriminator"))


def test_timm_vit_files_load_every_tensor(tmp_path, summaries):
    """timm's own ViT files (the hub's model.safetensors): class token and head unused, the
    patch rows of `pos_embed` taken as they are at 224 px and resized from a 384 px file."""
    torch.manual_seed(11)
    for timm_name, grid in (("vit_tiny_patch16_224", (14, 14)), ("vit_tiny_patch16_384", (24, 24))):
        state = {k: v.contiguous() for k, v in timm.create_model(timm_name, pretrained=False).state_dict().items()}
        assert state["pos_embed"].shape == (1, 1 + grid[0] * grid[1], 192) and "cls_token" in state
        path = tmp_path / f"{timm_name}.safetensors"
        save_file(state, str(path))
        module, _ = create_backbone("vit_tiny", str(path))
        own = module.weights_target().state_dict()
        for key in own:
            if key != "pos_embed":
                assert torch.equal(own[key], state[key]), key
        expected = state["pos_embed"][:, 1:]
        torch.testing.assert_close(own["pos_embed"], expected if grid == (14, 14) else _resized(expected, grid))
        line = summaries()
        assert "loaded 149/149 tensors (100.0%)" in line and "warning" not in line
        assert "cls_token (1" in line and "head (2" in line


def test_truncated_vit_files_are_refused_naming_what_is_missing(tmp_path):
    state = _vitpose_state()
    half = {k: v for k, v in state.items() if not (k.startswith("blocks.") and int(k.split(".")[1]) >= 6)}
    half = {k: v for k, v in half.items() if not k.startswith("last_norm.")}
    path = tmp_path / "vitpose_half.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in half.items()}}, path)
    with pytest.raises(BackboneLoadError) as refused:
        create_backbone("vit_tiny", str(path))
    message = str(refused.value)
    assert "matches only 75/149 tensors (50%)" in message and "\n" not in message
    assert "left at init: blocks (72, e.g. blocks.6.norm1.weight), norm (2, e.g. norm.weight)" in message
    # A file cut short on disk: one line, no traceback-worthy error.
    whole = tmp_path / "vitpose_whole.pth"
    torch.save({"state_dict": state}, whole)
    cut = tmp_path / "vitpose_cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(BackboneLoadError, match=r"cannot read backbone checkpoint .*vitpose_cut.pth"):
        create_backbone("vit_tiny", str(cut))


def test_non_finite_and_non_regular_backbone_files_are_refused(tmp_path):
    torch.manual_seed(12)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / "nan.pth"
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, path)
    with pytest.raises(BackboneLoadError, match=r"nan.pth: 100 of 100 matched tensors are non-finite \(NaN or "):
        create_backbone("resnet18", str(path))
    one = dict(state, **{"layer4.1.bn2.weight": torch.full((512,), float("inf"))})
    torch.save(one, path)
    with pytest.raises(BackboneLoadError, match=r"1 of 100 matched tensors are non-finite .*layer4 \(1, e.g. "):
        create_backbone("resnet18", str(path), partial_ok=True)
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)  # opening it would block: refused from its type alone
    with pytest.raises(BackboneLoadError, match=r"weights.pth is a FIFO, not a regular file"):
        create_backbone("resnet18", str(fifo))
    with pytest.raises(BackboneLoadError, match=r"/dev/zero is a character device, not a regular file"):
        create_backbone("resnet18", "/dev/zero")
    with pytest.raises(BackboneLoadError, match="is a directory"):
        create_backbone("resnet18", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="backbone checkpoint not found"):
        create_backbone("resnet18", str(tmp_path / "missing.pth"))
    # Before Ray: the training pre-flight turns each into a config error naming the key.
    from raytrain.train.launch import preflight_model
    vit_b = str(REPO / "configs" / "vit_b_paper.yaml")
    cfg = load_config(vit_b, ["data.mixture=[]", "data.train_shards=x", "model.backbone=resnet18",
                             "optim.layer_decay=1", "model.backbone_checkpoint=/dev/zero"])
    with pytest.raises(ConfigError, match=r"model.backbone_checkpoint: backbone checkpoint /dev/zero is a character "):
        preflight_model(cfg)


def test_inflated_size_of_a_zip_checkpoint_is_bounded(tmp_path, monkeypatch):
    from raytrain.model import backbones
    torch.manual_seed(13)
    path = tmp_path / "small.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    monkeypatch.setattr(backbones, "MAX_WEIGHTS_BYTES", path.stat().st_size - 1)
    with pytest.raises(BackboneLoadError, match=r"small.pth holds .* GiB, more than"):
        create_backbone("resnet18", str(path))


def test_timm_prefix_builds_any_timm_cnn_and_refuses_what_timm_lacks():
    module, dim = create_backbone("timm:resnet10t")
    assert dim == 512 and module(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    cfg = load_config(None, ["model.backbone=timm:convnext_atto"])
    assert cfg.model.backbone == "timm:convnext_atto"
    with pytest.raises(ConfigError, match=r"^model.backbone: 'timm:resnet5': timm [\d.]+ has no model 'resnet5'"):
        load_config(None, ["model.backbone=timm:resnet5"])
    with pytest.raises(ConfigError, match=r"model.backbone: 'timm:vit_base_patch16_224': .*fixed input size.*vit_base"):
        load_config(None, ["model.backbone=timm:vit_base_patch16_224"])
    with pytest.raises(ValueError, match="has no model 'resnet5'"):
        create_backbone("timm:resnet5")


def test_unknown_timm_backbone_exits_2_naming_the_key(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAYTRAIN_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "raytrain.cli", "train", "--config",
                          str(REPO / "configs" / "vit_b_paper.yaml"), "model.backbone=timm:nosuchnet"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"raytrain: config error: model.backbone: 'timm:nosuchnet': timm {timm.__version__} has no model "
        "'nosuchnet' (timm.list_models('nosu*') lists its names)"]


def _pickled_with_foreign_class(module_name: str, class_name: str, build, path):
    """torch.save of build(cls) with `cls` importable as module_name.class_name only while
    saving, as a checkpoint written by another project's code is read here."""
    import types
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module
    try:
        cls = build(module, class_name)
        torch.save(cls, path)
    finally:
        del sys.modules[module_name]


def test_hmr2_lightning_file_with_its_yacs_config_loads_and_runs_nothing(tmp_path, summaries):
    """HMR 2.0's checkpoint keeps its yacs CfgNode (a dict subclass) in `hyper_parameters`:
    torch's weights-only unpickler refuses the class; the backbone loader reads it as a
    plain mapping and takes the tensors. A file naming a function to call gets no call."""
    state = _vitpose_state(seed=14)

    def lightning(module, name):
        cfg_node = type(name, (dict,), {"__module__": module.__name__})
        setattr(module, name, cfg_node)
        cfg = cfg_node(MODEL=cfg_node(IMAGE_SIZE=256, BACKBONE=cfg_node(TYPE="vit")))
        cfg.__dict__["__immutable__"] = True  # yacs keeps its flags in the instance dict
        return {"state_dict": {f"backbone.{k}": v for k, v in state.items()}, "hyper_parameters": {"cfg": cfg}}
    path = tmp_path / "epoch=35-step=1000000.ckpt"
    _pickled_with_foreign_class("yacs_standin", "CfgNode", lightning, path)
    with pytest.raises(Exception, match="yacs_standin"):
        torch.load(path, weights_only=True)
    module, _ = create_backbone("vit_tiny", str(path))
    _assert_vitpose_loaded(module, state)
    line = summaries()
    assert "yacs_standin.CfgNode read as plain mappings" in line and "loaded 149/149" in line

    marker = tmp_path / "ran"

    def crafted(module, name):
        runner = type(name, (), {"__module__": module.__name__,
                                 "__reduce__": lambda self: (os.system, (f"touch {marker}",))})
        setattr(module, name, runner)
        return {"state_dict": {f"backbone.{k}": v for k, v in state.items()}, "extra": runner()}
    path = tmp_path / "crafted.ckpt"
    _pickled_with_foreign_class("crafted_standin", "Runner", crafted, path)
    with pytest.raises(BackboneLoadError) as refused:
        create_backbone("vit_tiny", str(path))
    message = str(refused.value)
    assert message.startswith(f"cannot read backbone checkpoint {path}: it holds more than tensors")
    assert "\n" not in message and "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert not marker.exists()
