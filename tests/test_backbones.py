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
