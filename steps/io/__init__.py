"""Storage and reading: URIs on any pyarrow filesystem, safe file reading, pixels, the shard step's sources, and
streamed id checks."""
