"""Every invalid configuration stops `raytrain train` with status 2 before Ray starts,
in one line naming the key (or the file) and the reason."""
import os
import sys

import pytest
from conftest import body_dir

from raytrain.cli import main

BASE = ["model.backbone=mobilenetv3_small_050", "data.train_shards=unused", "data.val_shards=unused"]


def _train(capsys, config_text: str | bytes | None = "name: t\n", overrides=(), path=None, tmp_path=None):
    if path is None:
        path = tmp_path / "config.yaml"
        if isinstance(config_text, bytes):
            path.write_bytes(config_text)
        else:
            path.write_text(config_text)
    code = main(["train", "--config", str(path), *BASE, f"model.smpl_dir={body_dir()}", *overrides])
    err = capsys.readouterr().err.strip()
    return code, err


def _no_ray():
    return "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


@pytest.mark.parametrize("override, key", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("loss.lambda_cam=nan", "loss.lambda_cam"),
    ("loss.lambda_cont=inf", "loss.lambda_cont"), ("loss.tau=nan", "loss.tau"), ("rois.offset=nan", "rois.offset"),
    ("data.scale_jitter=nan", "data.scale_jitter"), ("optim.grad_clip=inf", "optim.grad_clip"),
    ("model.dropout=nan", "model.dropout"), ("data.max_bad_fraction=nan", "data.max_bad_fraction"),
    ("loss.cam_weights=[0.1,.nan,1]", "loss.cam_weights[1]"), ("name=../../x", "name"), ("name=/abs", "name"),
    (f"model.smpl_dir={'/nonexistent/smpl'}", "model.smpl_dir"),
    ("data.train_shards=/dev/urandom", "data.train_shards"),
    ("data.train_shards=gs://bucket/shards", "data.train_shards"),
    ("train.storage_path=gs://bucket/runs", "train.storage_path"),
])
def test_invalid_values_exit_2_before_ray_naming_the_key(capsys, tmp_path, override, key):
    assert _no_ray()
    code, err = _train(capsys, overrides=[override], tmp_path=tmp_path)
    assert code == 2 and err.startswith("raytrain: config error: ") and len(err.splitlines()) == 1, err
    assert f"{key}:" in err or f"{key}=" in err, err
    assert _no_ray()


def test_gcs_and_s3_errors_say_what_to_install_or_configure(capsys, tmp_path, monkeypatch):
    code, err = _train(capsys, overrides=["data.train_shards=gs://bucket/shards"], tmp_path=tmp_path)
    assert code == 2 and "raytrain[gcs]" in err
    pytest.importorskip("s3fs")
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import s3fs
    try:
        code, err = _train(capsys, overrides=["data.train_shards=s3://bucket/shards"], tmp_path=tmp_path)
    finally:  # fsspec caches the credential-less client: later tests must not get it
        s3fs.S3FileSystem.clear_instance_cache()
    assert code == 2 and "data.train_shards" in err and "AWS_ACCESS_KEY_ID" in err, err


def test_unreadable_config_files_exit_2_in_one_line(capsys, tmp_path):
    code, err = _train(capsys, b"name: caf\xe9\n", tmp_path=tmp_path)
    assert code == 2 and "not UTF-8" in err and len(err.splitlines()) == 1
    code, err = _train(capsys, path=tmp_path)
    assert code == 2 and "is a directory" in err


@pytest.mark.timeout(60)
def test_a_config_path_that_is_a_fifo_is_refused_not_waited_on(capsys, tmp_path):
    """Nothing ever writes to the pipe: reading it would hang; it is refused at once."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    code, err = _train(capsys, path=fifo)
    assert code == 2 and "not a regular file" in err and len(err.splitlines()) == 1, err


def test_a_5001_digit_number_is_bad_json_with_its_reason(tmp_path):
    """Python refuses integers of over 4300 digits with a ValueError that is not a
    JSONDecodeError: in a sample's json and in a manifest it is still named for what it is."""
    from fixtures_data import make_fake_samples

    from raytrain.data import ManifestError, ShardReader, write_shards
    from raytrain.data.schema import BadSample, decode_sample
    raw = make_fake_samples(1, seed=3)[0]
    raw["json"] = raw["json"][:-1] + b', "focal": ' + b"9" * 5001 + b"}"
    with pytest.raises(BadSample) as caught:
        decode_sample(raw)
    assert caught.value.reason == "bad_json" and "digits" in caught.value.detail
    write_shards(make_fake_samples(4, seed=3), str(tmp_path / "set"), source="fake", licence="test")
    manifest = tmp_path / "set" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"num_samples": 4', '"num_samples": ' + "4" * 5001, 1))
    with pytest.raises(ManifestError, match="manifest is not valid JSON.*digits"):
        ShardReader(str(tmp_path / "set"), rank=0, world_size=1)


def test_yaml_alias_bomb_is_refused_at_once(capsys, tmp_path):
    """A 1 kB YAML whose aliases expand to 10^9 nodes: refused in a short line."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 10):
        previous = chr(ord("a") + level - 1)
        name = chr(ord("a") + level)
        lines.append(f"{name}: &{name} [" + ", ".join(f"*{previous}" for _ in range(10)) + "]")
    lines.append("name: *j")
    text = "\n".join(lines) + "\n"
    assert len(text) < 1100
    code, err = _train(capsys, text, tmp_path=tmp_path)
    assert code == 2 and "alias" in err and len(err) < 400, err[:500]


def test_search_space_values_are_held_to_the_same_rules(tmp_path):
    from raytrain.config import ConfigError
    from raytrain.tuning.space import load_space
    path = tmp_path / "space.yaml"
    path.write_text("space:\n  optim.lr: {dist: choice, values: [.nan, 1.0e-3]}\n")
    with pytest.raises(ConfigError, match="optim.lr: expected a finite number"):
        load_space(str(path))
    path.write_text("a: &a [1, 2]\nspace:\n  optim.lr: {dist: choice, values: *a}\n")
    with pytest.raises(ConfigError, match="alias"):
        load_space(str(path))


def test_tune_preflights_the_same_keys_before_ray(capsys, tmp_path):
    from conftest import REPO
    (tmp_path / "c.yaml").write_text("name: t\n")
    for override, key in (("model.smpl_dir=/nonexistent/smpl", "model.smpl_dir"),
                          ("train.storage_path=gs://bucket/runs", "train.storage_path")):
        code = main(["tune", "--config", str(tmp_path / "c.yaml"), "--space",
                     str(REPO / "tune" / "spaces" / "paper.yaml"), *BASE,
                     f"model.smpl_dir={body_dir()}", override])
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"{key}:" in err and len(err.splitlines()) == 1, err
    assert _no_ray()


def test_shard_output_on_gcs_without_gcsfs_says_what_to_install(capsys):
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    code = main(["shard", "synthetic", "--out", "gs://bucket/shards", "--n", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--out" in err and "raytrain[gcs]" in err and len(err.splitlines()) == 1
