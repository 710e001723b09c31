"""Data: shard schema, writer, streaming reader, cropper, loader, converters."""

from .errors import DataError, ManifestError, TooManyBadSamples
from .reader import ShardReader
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
from .shards import read_manifest, resolve_shards, verify_shards, write_shards
