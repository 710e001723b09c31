"""Data: shard schema, writer, streaming reader (cropper and renderer come beside them)."""

from .schema import (
    BAD_REASONS,
    SCHEMA_VERSION,
    BadSample,
    Sample,
    SchemaError,
    decode_jpeg,
    decode_sample,
    encode_sample,
)
from .shards import read_manifest, verify_shards, write_shards
from .reader import ShardReader, TooManyBadSamples, resolve_shards
