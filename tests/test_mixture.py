"""Dataset mixtures: fixed ratios, determinism, exact resume, logging, bad configs."""
from collections import Counter

import numpy as np
import pytest
from conftest import REPO, tiny_overrides
from fixtures_data import make_fake_samples
from torch.utils.data import DataLoader

from raytrain.cli import main as cli_main
from raytrain.config import ConfigError, load_config
from raytrain.data.mixture import MixtureReader, Piece, apportion, normalised_weights, worker_pieces
from raytrain.data.shards import write_shards
from raytrain.train.loop import run_loop
from raytrain.train.session import BareSession

DEMO = str(REPO / "configs" / "demo.yaml")


class KeyOf:
    """Transform: sample -> a dict item (what the cropper returns), here just the key."""

    def __call__(self, sample):
        return {"key": sample.key}


def _mixture(tmp_path, sizes, weights, **kwargs):
    sources = {}
    for name, n in sizes.items():
        out = tmp_path / name
        if not out.exists():
            write_shards(make_fake_samples(n, seed=len(name), source=name), str(out), source=name,
                         licence="test", maxcount=64)
        sources[name] = str(out)
    options = {"seed": 0, "rank": 0, "world_size": 1, "batch_size": 8, "shuffle_buffer": 16,
               "decode_images": False, "transform": KeyOf(), **kwargs}
    return MixtureReader(sources, weights, **options)


def _collate(items):
    return items


def test_apportion_and_weights():
    assert apportion(10, [0.75, 0.25]) == [8, 2]  # 7.5 / 2.5: ties go to the first
    assert apportion(7, [1 / 3, 1 / 3, 1 / 3]) == [3, 2, 2]
    assert sum(apportion(1001, [0.3, 0.6, 0.1])) == 1001
    assert normalised_weights({"a": 3, "b": 1}) == {"a": 0.75, "b": 0.25}
    with pytest.raises(ValueError, match="positive sum"):
        normalised_weights({"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="finite and >= 0: a"):
        normalised_weights({"a": float("nan"), "b": 1.0})


def test_worker_pieces_hand_worked():
    # positions 0..7, batch 2, 2 workers: worker 0 owns 0,1,4,5 and worker 1 owns 2,3,6,7
    sources = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    # source 0 per rank has 3 samples: 6 draws = 2 source epochs. Worker 0 takes its first
    # 2 (positions 0, 5), worker 1 the next 4 (positions 2, 3, 6, 7).
    assert worker_pieces(sources, 0, 3, 0, 0, 2, 2, 0) == [Piece(0, 0, 2, 0)]
    assert worker_pieces(sources, 0, 3, 0, 1, 2, 2, 0) == [Piece(0, 2, 3, 0), Piece(1, 0, 3, 0)]
    # mix epoch 1 uses source epochs 2 and 3; 4 positions consumed: worker 1 used 2 of source 0
    assert worker_pieces(sources, 0, 3, 1, 1, 2, 2, 4) == [Piece(2, 2, 3, 1), Piece(3, 0, 3, 1)]


def test_ratio_over_4000_samples_and_determinism(tmp_path):
    from raytrain.data.reader import Reader
    reader = _mixture(tmp_path, {"big": 1000, "small": 400}, {"big": 0.75, "small": 0.25})
    assert isinstance(reader, Reader) and isinstance(reader.readers[0], Reader)  # the loader's surface
    assert len(reader) == 1000  # the largest source's length (SPIN's MixedDataset)
    drawn = []
    for epoch in range(4):
        reader.set_epoch(epoch)
        items = list(reader)
        assert len(items) == 1000
        per_source = Counter(item["source"] for item in items)
        assert per_source == {"big": 750, "small": 250}
        for name in per_source:  # within an epoch no sample of a source comes twice
            keys = [item["key"] for item in items if item["source"] == name]
            assert len(keys) == len(set(keys)) and all(k.startswith(name + "/") for k in keys)
        drawn += items
    share = Counter(item["source"] for item in drawn)["big"] / len(drawn)
    assert len(drawn) == 4000 and abs(share - 0.75) < 0.02
    again = _mixture(tmp_path, {"big": 1000, "small": 400}, {"big": 0.75, "small": 0.25})
    again.set_epoch(3)
    assert [i["key"] for i in again] == [i["key"] for i in drawn[3000:]]  # same seed, same draw
    other = _mixture(tmp_path, {"big": 1000, "small": 400}, {"big": 0.75, "small": 0.25}, seed=1)
    other.set_epoch(3)
    assert [i["key"] for i in other] != [i["key"] for i in drawn[3000:]]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_loses_and_repeats_nothing(tmp_path, workers):
    sizes, weights = {"a": 120, "bb": 50}, {"a": 3.0, "bb": 1.0}

    def epoch_keys(consumed):
        reader = _mixture(tmp_path, sizes, weights)
        reader.load_state_dict({"epoch": 2, "consumed": consumed})
        loader = DataLoader(reader, batch_size=8, num_workers=workers, collate_fn=_collate)
        return [item["key"] for batch in loader for item in batch]

    whole = epoch_keys(0)
    assert len(whole) == 120
    head = whole[:40]  # 5 batches consumed before the interruption
    rest = epoch_keys(40)
    assert head + rest == whole  # nothing lost, nothing repeated, same order


def test_training_on_a_mixture_resumes_exactly_and_logs_sources(synthetic_shards, tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="raytrain")
    train, val = synthetic_shards
    mixture = (f"[{{name: synth_a, shards: {train}, weight: 0.75}}, "
               f"{{name: synth_b, shards: {val}, weight: 0.25}}]")

    def run(folder, steps):
        cfg = load_config(DEMO, tiny_overrides("", val, tmp_path / folder, **{
            "data.mixture": mixture, "optim.max_steps": steps, "train.checkpoint_every": 9,
            "train.val_every": 100, "train.sample_log": tmp_path / folder / "keys",
            "data.loader_workers": 2, "train.tensorboard": folder == "a"}))  # persistent workers
        run_loop(cfg, BareSession(str(tmp_path / folder), device="cpu"))

    run("a", 13)
    progress = [line for line in caplog.messages if " step 12/13 " in line]
    assert progress and "sources synth_a=36 synth_b=12" in progress[0]  # epoch 0: 3 to 1
    scalars = _scalars(next((tmp_path / "a").rglob("events.out.tfevents.*")))
    assert scalars[("data/samples_synth_a", 12)] == 36 and scalars[("data/samples_synth_b", 12)] == 12
    run("b", 9)
    run("b", 13)
    whole = (tmp_path / "a/keys.rank0.txt").read_text().splitlines()
    resumed = (tmp_path / "b/keys.rank0.txt").read_text().splitlines()
    assert resumed == whole  # 9 steps, then the rest from the checkpoint: the same 52 samples
    epoch0 = [line.split()[2] for line in whole if line.split()[1] == "0"]
    assert len(epoch0) == len(set(epoch0)) == 48  # L = 48 (the larger source): 36 + 12


def _scalars(path) -> dict:
    """(tag, step) -> value of a TensorBoard event file (TFRecord framing, tensorboardX protos)."""
    import struct

    from tensorboardX.proto import event_pb2
    data, out, offset = path.read_bytes(), {}, 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            out[(value.tag, event.step)] = value.simple_value
    return out


def test_bad_mixtures_stop_before_workers_start(synthetic_shards, tmp_path, capsys):
    train, val = synthetic_shards
    zero = f"[{{name: a, shards: {train}, weight: 0}}, {{name: b, shards: {val}, weight: 0.0}}]"
    args = ["train", "--config", DEMO, *tiny_overrides("", val, tmp_path)]
    assert cli_main([*args, f"data.mixture={zero}"]) == 2
    assert "data.mixture: weights sum to 0.0" in capsys.readouterr().err
    missing = f"[{{name: a, shards: {train}, weight: 1}}, {{name: h36m, shards: {tmp_path}/no, weight: 1}}]"
    assert cli_main([*args, f"data.mixture={missing}"]) == 2
    err = capsys.readouterr().err
    assert "data.mixture[1].shards (h36m): cannot read shards" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="data.train_shards or data.mixture, not both"):
        load_config(DEMO, tiny_overrides(train, val, tmp_path, **{"data.mixture": missing}))
