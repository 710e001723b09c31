"""`raytrain doctor`: one line per check, the one-line SMPL note naming the flag, and a
non-zero exit code when something required (shards, a cluster, body model files) is missing."""
import socket

import pytest
import yaml
from fixtures_data import make_fake_samples

from raytrain.apps.doctor import run_doctor
from raytrain.cli import main as cli_main
from raytrain.data.shards import write_shards


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def write_config(path, train, val):
    path.write_text(yaml.safe_dump({"data": {"train_shards": str(train), "val_shards": str(val)}}))
    return str(path)


def run(**kwargs):
    lines = []
    code = run_doctor(print_fn=lines.append, **kwargs)
    return code, lines


def test_no_smpl_is_one_line_naming_the_flag_and_missing_shards_fail(tmp_path):
    config = write_config(tmp_path / "c.yaml", tmp_path / "nope/train", tmp_path / "nope/val")
    code, lines = run(config=config)
    assert code != 0
    smpl = [line for line in lines if "SMPL" in line]
    assert len(smpl) == 1
    assert "--smpl-dir" in smpl[0] and "model.smpl_dir" in smpl[0] and "synthetic" in smpl[0]
    shard_lines = [line for line in lines if line.split()[1].startswith("data.")]
    assert len(shard_lines) == 2 and all(line.startswith("MISSING") for line in shard_lines)
    assert all("raytrain shard synthetic" in line for line in shard_lines)
    assert all(line.split()[0] in ("OK", "MISSING") for line in lines[:-1])


def test_cli_doctor_exit_codes(tmp_path, capsys):
    missing = write_config(tmp_path / "m.yaml", tmp_path / "a", tmp_path / "b")
    assert cli_main(["doctor", "--config", missing]) == 1
    out = capsys.readouterr().out
    assert sum("SMPL" in line for line in out.splitlines()) == 1 and "--smpl-dir" in out

    write_shards(make_fake_samples(6, seed=0), str(tmp_path / "train"), "fake", "test", maxcount=4)
    write_shards(make_fake_samples(3, seed=1), str(tmp_path / "val"), "fake", "test")
    good = write_config(tmp_path / "g.yaml", tmp_path / "train", tmp_path / "val")
    assert cli_main(["doctor", "--config", good]) == 0
    out = capsys.readouterr().out
    assert "6 samples in 2 shard(s)" in out and "3 samples in 1 shard(s)" in out
    assert cli_main(["doctor"]) == 0          # no config: nothing required is missing


def test_incomplete_smpl_dir_fails_naming_the_files(tmp_path):
    (tmp_path / "smpl").mkdir()
    (tmp_path / "smpl" / "SMPL_NEUTRAL.pkl").write_bytes(b"x")
    code, lines = run(smpl_dir=str(tmp_path / "smpl"))
    assert code == 1
    line = next(line for line in lines if line.split()[1:3] == ["body", "model:"])
    assert line.startswith("MISSING") and "SMPL_MALE.pkl" in line and "J_regressor_h36m.npy" in line


def test_unreachable_cluster_fails(monkeypatch):
    with socket.socket() as sock:           # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    code, lines = run()
    assert code == 1
    line = next(line for line in lines if "ray cluster" in line)
    assert line.startswith("MISSING") and "unset RAY_ADDRESS" in line


def test_bad_config_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {crop_sise: 64}\n")
    code, lines = run(config=str(bad))
    assert code == 1 and lines[0].startswith("MISSING") and "crop_sise" in lines[0]


def test_doctor_fails_shards_that_disagree_with_their_manifest(tmp_path):
    """New shards beside an old manifest (an interrupted re-conversion), or a shard of
    another size than recorded, are not OK."""
    from fixtures_data import make_fake_samples

    from raytrain.apps.doctor import check_shard_set
    from raytrain.data.shards import write_shards
    write_shards(make_fake_samples(20, seed=1), str(tmp_path / "s"), source="f", licence="t", maxcount=10)
    assert check_shard_set("data.val_shards", str(tmp_path / "s")).status == "OK"
    shard = tmp_path / "s" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    check = check_shard_set("data.val_shards", str(tmp_path / "s"))
    assert check.status != "OK" and "shard-000001.tar" in check.message
    write_shards(make_fake_samples(20, seed=1), str(tmp_path / "s"), source="f", licence="t", maxcount=10)
    (tmp_path / "s" / "shard-000002.tar").write_bytes(shard.read_bytes())
    check = check_shard_set("data.val_shards", str(tmp_path / "s"))
    assert check.status != "OK" and "not listed" in check.message
    # every missing shard is counted, not only the first
    write_shards(make_fake_samples(30, seed=1), str(tmp_path / "t"), source="f", licence="t", maxcount=10)
    for name in ("shard-000000.tar", "shard-000002.tar"):
        (tmp_path / "t" / name).unlink()
    check = check_shard_set("data.val_shards", str(tmp_path / "t"))
    assert check.status != "OK" and "2 of the 3 shards listed" in check.message
    assert "shard-000000.tar: missing" in check.message and len(check.message.splitlines()) == 1


def test_doctor_and_the_preflight_check_the_sets_the_run_reads_once_each(tmp_path, monkeypatch):
    """A weight-0 mixture source is never read by training: neither doctor nor the
    pre-flight checks it (its shards do not exist here); every other set's manifest is
    read once."""
    from raytrain.config import load_config
    from raytrain.data import shards
    from raytrain.data.pipeline import shard_sets
    from raytrain.train.launch import preflight_data

    write_shards(make_fake_samples(8, seed=0), str(tmp_path / "a"), "fake", "test", maxcount=4)
    write_shards(make_fake_samples(4, seed=1), str(tmp_path / "val"), "fake", "test")
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "mixture": [{"name": "a", "shards": str(tmp_path / "a"), "weight": 1.0},
                    {"name": "unused", "shards": str(tmp_path / "absent"), "weight": 0.0}],
        "val_shards": str(tmp_path / "val"), "batch_size": 4}}))
    cfg = load_config(str(config))
    assert [(s.key, s.split) for s in shard_sets(cfg)] == [("data.mixture[0].shards (a)", "train"),
                                                          ("data.val_shards", "val")]
    reads = []
    real = shards.read_manifest
    monkeypatch.setattr(shards, "read_manifest", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    code, lines = run(config=str(config))
    shard_lines = [line for line in lines if line.split()[1].startswith("data.")]
    assert code == 0 and len(shard_lines) == 2 and all(line.startswith("OK") for line in shard_lines)
    assert "8 samples in 2 shard(s)" in shard_lines[0] and "unused" not in "".join(lines)
    assert len(reads) == 2 and len(set(reads)) == 2  # one read per set
    preflight_data(cfg)  # the absent weight-0 source is not checked here either
