"""Dataset converters: raw releases and SPIN/CLIFF-style ``.npz`` files -> schema-v1 shards.

    from raytrain.data.convert import convert_spin_npz, convert_3dpw
    summary = convert_3dpw("/data/3DPW", "test", "shards/3dpw-test", workers=2)
    print(summary.format())

A converter yields ``Record``s (key, image path, labels in full-image pixels / camera
metres); ``run_conversion`` reads the images in parallel workers, cuts the stored
region around each person, encodes schema-v1 samples and writes the shards, counting
every skipped record by reason (``SKIP_REASONS``) and naming the input keys no record
used. ``sources.CONVERTERS`` is the registry behind ``raytrain shard <source>``
(``--ray``: ``distributed.shard_with_ray``); ``datasets/shard_<source>.py`` call it and
``datasets/README.md`` lists the raw layouts and licences.
"""

from .common import (
    SKIP_REASONS,
    ConversionError,
    ConversionSummary,
    Record,
    RecordSet,
    StorageConfig,
    convert_record,
    convert_record_set,
    run_conversion,
)
from .pw3d import (
    PW3D_LICENCE,
    REQUIRED_KEYS,
    SequenceFileError,
    convert_3dpw,
    load_sequence_file,
    pw3d_record_set,
    pw3d_records,
)
from .spin_npz import SOURCES, convert_spin_npz, read_spin_npz, spin_npz_record_set, spin_npz_records

__all__ = [
    "SKIP_REASONS", "ConversionError", "ConversionSummary", "Record", "RecordSet", "StorageConfig", "convert_record",
    "convert_record_set", "run_conversion", "PW3D_LICENCE", "REQUIRED_KEYS", "SequenceFileError",
    "convert_3dpw", "load_sequence_file", "pw3d_record_set", "pw3d_records", "SOURCES",
    "convert_spin_npz", "read_spin_npz", "spin_npz_record_set", "spin_npz_records",
]
