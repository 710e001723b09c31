"""Checkpoints from outside: a trained network is its checkpoint (no training-only input is
read again, each checkpoint hashed once per command), and a crafted state.pt ends in one
line. No mocks: a small network trained for two steps with the real loop, the real CLI."""
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter

import pytest
import timm
import torch
from conftest import REPO
from test_eval import small_overrides, write_synthetic
from test_predict import FRAMES, coco_bbox, image_name

import raytrain.data.io
from raytrain.checkpoints import save_checkpoint, verify_local
from raytrain.cli import main as cli_main
from raytrain.config import load_config
from raytrain.synthetic.people import SyntheticGenerator, encode_raw
from raytrain.train.loop import run_loop
from raytrain.train.session import BareSession


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Validation shards, images with a detections file, and a checkpoint trained from a
    backbone file that is deleted afterwards."""
    root = tmp_path_factory.mktemp("checkpoints")
    write_synthetic(root / "train", 8, seed=1)
    write_synthetic(root / "val", 6, seed=2)
    images = root / "images"
    images.mkdir()
    detections = []
    for sample in (encode_raw(raw) for raw in SyntheticGenerator(FRAMES).samples(3, range(3))):
        name = image_name(sample["__key__"])
        (images / name).write_bytes(sample["jpg"])
        box = json.loads(sample["json"])["box"]
        detections.append({"image_id": name, "category_id": 1, "bbox": coco_bbox(box), "score": 0.9})
    (root / "detections.json").write_text(json.dumps(detections))
    backbone = root / "backbone.pt"
    torch.save(timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict(), backbone)
    cfg = load_config(None, small_overrides(root) + [f"model.backbone_checkpoint={backbone}"])
    session = BareSession(str(root / "experiment"), device="cpu")
    run_loop(cfg, session)
    backbone.unlink()
    return {"root": root, "checkpoint": session.latest_checkpoint_dir(), "images": images,
            "detections": root / "detections.json"}


@pytest.fixture
def hashes(monkeypatch):
    """The files hashed by the one SHA-256 function, counted."""
    counted = Counter()
    original = raytrain.data.io.sha256_of

    def counting(url, *args, **kwargs):
        counted[str(url)] += 1
        return original(url, *args, **kwargs)
    monkeypatch.setattr(raytrain.data.io, "sha256_of", counting)
    return counted


def _eval(world, checkpoint, out):
    return ["eval", "--checkpoint", str(checkpoint), "--data", str(world["root"] / "val"), "--out", str(out)]


def _predict(world, checkpoint, out):
    return ["predict", str(world["images"]), "--checkpoint", str(checkpoint), "--detections",
            str(world["detections"]), "--out", str(out), "--device", "cpu"]


def test_checkpoint_of_a_deleted_backbone_file_is_evaluated_and_predicted(world, tmp_path, hashes):
    """The backbone file it was trained from is gone: eval and predict build the network
    from the checkpoint alone, and hash its state.pt once per command."""
    state = os.path.join(world["checkpoint"], "state.pt")
    assert cli_main(_eval(world, world["checkpoint"], tmp_path / "eval")) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["overall"]["num_samples"] == 6
    assert hashes == {state: 1}
    hashes.clear()
    assert cli_main(_predict(world, world["checkpoint"], tmp_path / "predict")) == 0
    records = (tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()
    assert len(records) == 3
    assert hashes == {state: 1}


def test_experiment_best_hashes_only_the_chosen_checkpoint_once(world, tmp_path, hashes):
    experiment = world["root"] / "experiment"
    assert cli_main(["eval", "--experiment", str(experiment), "--best", "--data", str(world["root"] / "val"),
                     "--out", str(tmp_path / "eval")]) == 0
    chosen = json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoint"]
    assert hashes == {os.path.join(chosen, "state.pt"): 1}


_OFFLINE_BUILD = """
from raytrain.model import create_backbone
create_backbone("mobilenetv3_small_050", pretrained="imagenet")
"""


@pytest.mark.slow
def test_checkpoint_trained_from_imagenet_weights_is_used_offline(world, tmp_path):
    """A checkpoint whose config says model.pretrained=imagenet, with the hub unreachable
    and nothing cached: eval and predict run (the checkpoint's weights are the model)."""
    state = dict(verify_local(world["checkpoint"]).state())
    stored = json.loads(state["config"])
    stored["model"].update(pretrained="imagenet", backbone_checkpoint=None)
    state["config"] = json.dumps(stored)
    save_checkpoint(tmp_path / "imagenet", state)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub"),
           "HF_HOME": str(tmp_path / "empty-home"), "PYTHONPATH": str(REPO)}
    build = subprocess.run([sys.executable, "-c", _OFFLINE_BUILD], capture_output=True, text=True, env=env,
                           timeout=300)
    assert build.returncode != 0 and "could not load ImageNet weights" in build.stderr  # the hub is unreachable
    for args in (_eval(world, tmp_path / "imagenet", tmp_path / "eval"),
                 _predict(world, tmp_path / "imagenet", tmp_path / "predict")):
        run = subprocess.run([sys.executable, "-m", "raytrain.cli", *args], capture_output=True, text=True,
                             env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "eval" / "metrics.json").is_file()
    assert (tmp_path / "predict" / "predictions.jsonl").read_text().strip()


class Planted:
    """Any class: a pickle of it runs code the file chooses when unpickled in full."""


def _one_line_refusal(capsys, code, needle):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if not line.startswith("[")]   # "[predict] body model: ..."
    assert len(errors) == 1 and needle in errors[0], err
    assert "weights_only" not in err and "Traceback" not in err
    return errors[0]


def test_state_holding_a_pickled_object_is_one_line(world, tmp_path, capsys):
    state = dict(verify_local(world["checkpoint"]).state())
    state["planted"] = Planted()
    save_checkpoint(tmp_path / "planted", state)        # a valid commit record: only the content is wrong
    capsys.readouterr()
    err = _one_line_refusal(capsys, cli_main(_eval(world, tmp_path / "planted", tmp_path / "eval")),
                            "holds a pickled object")
    assert "Planted" in err
    _one_line_refusal(capsys, cli_main(_predict(world, tmp_path / "planted", tmp_path / "predict")),
                      "holds a pickled object")


def test_state_inflating_beyond_its_file_is_refused_before_loading(world, tmp_path, capsys):
    """A DEFLATE-packed state.pt holding 64 MB of zeros besides the trained state, in a file
    a fraction of that (its commit record matching): refused from the zip directory, before
    torch.load allocates."""
    state = dict(verify_local(world["checkpoint"]).state())
    state["padding"] = torch.zeros(16 << 20)                       # 64 MB, compresses to ~64 KB
    save_checkpoint(tmp_path / "plain", state)
    packed = tmp_path / "packed"
    packed.mkdir()
    with zipfile.ZipFile(tmp_path / "plain" / "state.pt") as source, \
            zipfile.ZipFile(packed / "state.pt", "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    size = (packed / "state.pt").stat().st_size
    with zipfile.ZipFile(packed / "state.pt") as archive:
        assert sum(info.file_size for info in archive.infolist()) > 3 * size
    _, digest = raytrain.data.io.sha256_of(str(packed / "state.pt"))
    (packed / "COMMIT.json").write_text(json.dumps({"step": 2, "sha256": digest, "format": 1, "metrics": {}}))
    capsys.readouterr()
    _one_line_refusal(capsys, cli_main(_eval(world, packed, tmp_path / "eval")), "inflate")
