"""Storage access of the data pipeline: the project's one storage module, :mod:`ckf_dist.storage`."""

from ckf_dist.storage import (STORAGE_OPTIONS_ENV, exists, invalidate, join, read_bytes, storage_options_from_env,
                              unreachable, write_bytes_atomic)
from ckf_dist.storage import open_url as open_fs

__all__ = ["STORAGE_OPTIONS_ENV", "exists", "invalidate", "join", "open_fs", "read_bytes", "storage_options_from_env",
           "unreachable", "write_bytes_atomic"]
