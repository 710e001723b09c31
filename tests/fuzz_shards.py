"""A fuzz corpus generator: a small shard set holding every damage class the reader must
survive, with the keys it must deliver and the count it must report for each reason.

    corpus = write_fuzz_corpus(tmp_path)
    corpus.good        # keys of the samples that must be delivered, each exactly once
    corpus.expected    # {reason: count} the reader must report
    corpus.jpegs       # key -> the JPEG bytes written for it (to match image and json)

Real tars (``write_shards``), real JPEGs made with cv2, real npz members; every damage is
done to the bytes as a careless or hostile writer would.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from fixtures_data import make_fake_samples, rewrite_npz

from raytrain.data.shards import write_shards


def header_bomb_jpeg(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose frame header declares ``width`` x ``height`` (~300 bytes)."""
    ok, encoded = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def sparse_jpeg(width: int, height: int, size: int) -> bytes:
    """A header-bomb JPEG padded with comment segments to ``size`` bytes: plausible by its
    size alone, far too few bytes for the ``width`` x ``height`` it declares."""
    data = header_bomb_jpeg(width, height)
    comments = b""
    while len(data) + len(comments) < size:
        body = b"x" * min(65000, size - len(data) - len(comments))
        comments += b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body
    return data[:2] + comments + data[2:]


def other_size_jpeg(width: int = 64, height: int = 64) -> bytes:
    """A valid JPEG of another size than the json's ``stored_size``: a bright image, so a
    sample delivered with it would show."""
    ok, encoded = cv2.imencode(".jpg", np.full((height, width, 3), 250, np.uint8))
    assert ok
    return encoded.tobytes()


def with_exif_orientation(data: bytes, orientation: int = 6) -> bytes:
    """The JPEG with an EXIF block saying "rotate by 90 degrees on display": the stored
    pixels (and the json's geometry) are unchanged, so a reader must ignore it."""
    exif = (b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01"
            + struct.pack(">H", orientation) + b"\x00\x00\x00\x00\x00\x00")
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:]


def npy_bytes(header_shape: tuple[int, ...], payload: bytes) -> bytes:
    """An npy file whose header declares ``header_shape`` float32, followed by ``payload``."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {header_shape!r}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def deflate_bomb_npz(raw: dict, floats: int = 8_000_000) -> bytes:
    """The sample's npz with ``betas.npy`` deflated: ``floats`` zeros declared and
    inflating to 4 x ``floats`` bytes from a few tens of kB (~1000x amplification)."""
    with np.load(io.BytesIO(raw["npz"])) as npz:
        arrays = {name: npz[name] for name in npz.files}
    head = npy_bytes((floats,), b"")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunks = [compressor.compress(head)]
    zeros = bytes(1 << 20)
    for _ in range(floats * 4 // len(zeros)):
        chunks.append(compressor.compress(zeros))
    chunks.append(compressor.flush())
    return _zip_with_raw_member(arrays, "betas.npy", head, floats * 4 // len(zeros) * len(zeros),
                                b"".join(chunks))


def _zip_with_raw_member(arrays: dict, name: str, head: bytes, zeros: int, deflated: bytes) -> bytes:
    """A zip of the other arrays (stored) plus ``name``: ``deflated`` as its data, its
    sizes declared as ``len(head) + zeros`` uncompressed."""
    members = []
    for array_name, value in arrays.items():
        if f"{array_name}.npy" == name:
            continue
        saved = io.BytesIO()
        np.save(saved, value)
        data = saved.getvalue()
        members.append((f"{array_name}.npy".encode(), 0, data, zlib.crc32(data), len(data)))
    crc = zlib.crc32(bytes(zeros), zlib.crc32(head))
    members.append((name.encode(), 8, deflated, crc, len(head) + zeros))
    out, central = io.BytesIO(), io.BytesIO()
    for member_name, method, data, checksum, size in members:
        offset = out.tell()
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, checksum,
                              len(data), size, len(member_name), 0) + member_name + data)
        central.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0,
                                  checksum, len(data), size, len(member_name), 0, 0, 0, 0, 0, offset)
                      + member_name)
    start, directory = out.tell(), central.getvalue()
    out.write(directory)
    out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members),
                          len(directory), start, 0))
    return out.getvalue()


def _json(raw: dict, **changes) -> None:
    meta = json.loads(raw["json"])
    meta.update(changes)
    raw["json"] = json.dumps(meta).encode()


def _pickled_npz(raw: dict) -> None:
    with np.load(io.BytesIO(raw["npz"])) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["pose"] = np.array([object()] * 72, dtype=object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw["npz"] = buffer.getvalue()


def _padded_npz(raw: dict) -> None:
    """An 800 kB npz member (the label arrays plus 200k floats of padding)."""
    with np.load(io.BytesIO(raw["npz"])) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["padding"] = np.random.default_rng(0).normal(size=200_000).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw["npz"] = buffer.getvalue()


#: name -> (reason the reader must count, damage done to one encoded sample in place)
SAMPLE_DAMAGE: dict[str, tuple[str, Callable[[dict], None]]] = {
    "jpeg_header_bomb_30000": ("too_large", lambda r: r.update(jpg=header_bomb_jpeg(30000, 30000))),
    "jpeg_header_bomb_16000": ("too_large", lambda r: (r.update(jpg=header_bomb_jpeg(16000, 16000)),
                                                       _json(r, stored_size=[16000, 16000]))),
    "jpeg_other_size": ("bad_jpeg", lambda r: r.update(jpg=other_size_jpeg())),
    "jpeg_garbage": ("bad_jpeg", lambda r: r.update(jpg=b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9")),
    "npy_deflate_bomb": ("too_large", lambda r: r.update(npz=deflate_bomb_npz(r))),
    "npz_member_800k": ("too_large", _padded_npz),
    "npz_pickled": ("bad_array", _pickled_npz),
    "npz_text": ("bad_array", lambda r: r.update(npz=b"this is a text file named .npz\n")),
    "npz_wrong_shape": ("bad_array", lambda r: rewrite_npz(r, "joints_3d", np.zeros((17, 4), np.float32))),
    "json_truncated": ("bad_json", lambda r: r.update(json=b'{"schema_version": 1, "box": [1, 2')),
    "json_member_100k": ("too_large", lambda r: _json(r, padding="x" * 100_000)),
    "json_depth_bomb": ("bad_json", lambda r: r.update(json=b"[" * 30000 + b"]" * 30000)),
    "flag_string_false": ("bad_json", lambda r: _json(r, has_smpl="false")),
    "count_as_bool": ("bad_json", lambda r: _json(r, image_size=[True, 240])),
    "box_side_1e30": ("label_out_of_range", lambda r: _json(r, box=[160.0, 120.0, 1e30])),
    "focal_absurd": ("label_out_of_range", lambda r: _json(r, focal=1e12)),
    "image_size_absurd": ("label_out_of_range", lambda r: _json(r, image_size=[10_000_000, 240])),
    "pose_absurd": ("label_out_of_range", lambda r: rewrite_npz(r, "pose", np.full(72, 1e6, np.float32))),
    "betas_absurd": ("label_out_of_range", lambda r: rewrite_npz(r, "betas", np.full(10, 1e4, np.float32))),
    "depth_absurd": ("label_out_of_range", lambda r: rewrite_npz(r, "joints_3d", np.full((24, 4), 1e9,
                                                                                          np.float32))),
    "nan_label": ("nonfinite_label", lambda r: rewrite_npz(r, "pose", np.full(72, np.nan, np.float32))),
    "box_outside": ("box_outside_image", lambda r: _json(r, box=[5000.0, 5000.0, 30.0])),
    "missing_npz": ("missing_key", lambda r: r.pop("npz")),
    "jpeg_80kb_declaring_36mp": ("too_large", lambda r: (r.update(jpg=sparse_jpeg(6000, 6000, 80_000)),
                                                         _json(r, stored_size=[6000, 6000]))),
}

#: Damage to the tar's layout, done by ``write_fuzz_corpus`` itself: reason -> what.
TAR_DAMAGE = {
    "duplicate_key": "a sample written under the key of a sample two before it in its shard",
    "duplicate_member": "a sample's json member written twice",
}


@dataclass
class FuzzCorpus:
    path: Path
    good: set[str]
    expected: Counter
    jpegs: dict[str, bytes] = field(default_factory=dict)
    total: int = 0


def write_fuzz_corpus(path: Path, good_per_damage: int = 3, seed: int = 0) -> FuzzCorpus:
    """Every sample-level damage class once, spread over shards of 10, with good samples
    between them; then tar damage: garbage over one member header and a cut last shard."""
    damages = list(SAMPLE_DAMAGE.items())
    total = -(-(len(damages) * (good_per_damage + 1) + 10) // 10) * 10  # full shards of 10
    samples = make_fake_samples(total, seed=seed)
    expected: Counter = Counter()
    bad_index: set[int] = set()
    for number, (_, (reason, damage)) in enumerate(damages):
        index = number * (good_per_damage + 1) + 1
        damage(samples[index])
        expected[reason] += 1
        bad_index.add(index)
    samples[2]["jpg"] = with_exif_orientation(samples[2]["jpg"])  # good: delivered unrotated
    duplicate = 10 * (total // 10 - 2) + 8  # in the second-last shard, away from the cut one
    samples[duplicate]["__key__"] = samples[duplicate - 2]["__key__"]
    twice = duplicate - 4
    expected.update(["duplicate_key", "duplicate_member"])
    bad_index |= {duplicate, twice}
    write_shards(samples, str(path), source="fake", licence="test", maxcount=10)
    shards = sorted(path.glob("*.tar"))
    _member_twice(path, shards[-2], f"{samples[twice]['__key__']}.json")
    lost = _garbage_over_header(shards[1], samples, 10) | _cut(shards[-1], samples, 10 * (len(shards) - 1))
    expected["corrupt_member"] += len(lost - bad_index)
    for index in lost & bad_index:  # damaged twice: the tar damage decides
        expected[_reason_of(index, good_per_damage)] -= 1
        expected["corrupt_member"] += 1
    expected = +expected
    bad_index |= lost
    good = {s["__key__"] for i, s in enumerate(samples) if i not in bad_index}
    jpegs = {s["__key__"]: s["jpg"] for i, s in enumerate(samples) if i not in bad_index}
    return FuzzCorpus(path, good, expected, jpegs, total)


def _reason_of(index: int, good_per_damage: int) -> str:
    return list(SAMPLE_DAMAGE.values())[(index - 1) // (good_per_damage + 1)][0]


def _member_twice(path: Path, shard: Path, name: str) -> None:
    """Rewrite ``shard`` with member ``name`` a second time right after the first (other
    bytes), and the manifest's size and sha256 of the shard to match."""
    import hashlib
    import tarfile
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
            if info.name == name:
                tar.addfile(info, io.BytesIO(data.replace(b'"focal"', b'"focal" ')[:info.size].ljust(info.size)))
    manifest = json.loads((path / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["name"] == shard.name)
    entry["bytes"] = shard.stat().st_size
    entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def huge_count_manifest(path: Path, count: int = 10**12, with_bytes: bool = True) -> Path:
    """A good shard set of 20 whose manifest says its second shard holds ``count`` samples
    (``with_bytes=False``: the manifest records no sizes, and that shard is missing)."""
    write_shards(make_fake_samples(20, seed=9), str(path), source="fake", licence="test", maxcount=10)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["shards"][1]["num_samples"] = count
    manifest["num_samples"] = 10 + count
    if not with_bytes:
        for entry in manifest["shards"]:
            entry.pop("bytes")
        (path / manifest["shards"][1]["name"]).unlink()
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def _garbage_over_header(shard: Path, samples: list[dict], first: int) -> set[int]:
    """Random bytes over the header of the 3rd sample's jpg member: that sample is lost."""
    import tarfile
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    key = samples[first + 2]["__key__"]
    target = next(m for m in members if m.name == f"{key}.jpg")
    data = bytearray(shard.read_bytes())
    header = target.offset_data - 512
    data[header:header + 512] = np.random.default_rng(1).bytes(512)
    shard.write_bytes(bytes(data))
    return {first + 2}


def _cut(shard: Path, samples: list[dict], first: int) -> set[int]:
    """The last shard cut inside its 6th sample's jpg: it and the rest are lost."""
    import tarfile
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = [samples[i]["__key__"] for i in range(first, len(samples))]
    target = next(m for m in members if m.name == f"{keys[5]}.jpg")
    shard.write_bytes(shard.read_bytes()[:target.offset_data + 50])
    return set(range(first + 5, len(samples)))
