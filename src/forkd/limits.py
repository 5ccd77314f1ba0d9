"""The limits and enumerations of the API, in one place: the daemon's request models, the SDK's checks
and the CLI's options import them from here (the OpenAPI document shows the daemon's)."""

from __future__ import annotations

TAG_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"          # snapshot tags
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"           # sandbox ids
IMAGE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"

MIN_MEMORY_MIB, MAX_MEMORY_MIB = 128, 65536        # guest RAM of a snapshot
MIN_VCPUS, MAX_VCPUS = 1, 64
MAX_CHILDREN = 1000                              # children of one spawn request
NETWORKS = ("internet", "none", "user")         # "user": the old name of "internet"
BRANCH_MODES = ("auto", "delta", "flat")
#: the original forkd's branch modes, accepted as: full -> flat, diff -> delta, live -> auto
ORIGINAL_BRANCH_MODES = {"full": "flat", "diff": "delta", "live": "auto"}
MIN_MEMORY_LIMIT_MIB, MAX_MEMORY_LIMIT_MIB = 64, 1 << 20
MAX_EXPOSE = 16                                  # guest ports forwarded per sandbox
MAX_TIMEOUT_S = 3600.0                           # restore, eval, run_code, snapshot boot
MAX_EXEC_TIMEOUT_S = 86400.0
MAX_CODE_BYTES = 16 << 20                        # eval expressions, run_code cells
MAX_WARM_CODE_BYTES = 1 << 20
MAX_EXEC_OUTPUT = 1 << 20                        # bytes kept per stream of an exec
MAX_ARGV = 4096
MAX_STDIN_BYTES = 64 << 20
MAX_PATH = 4096
MAX_LIFETIME_S = 7 * 86400.0                     # a sandbox's lifetime (spawn, extend)
MAX_METADATA = 64                                # labels per sandbox
METADATA_KEY_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}$"
MAX_METADATA_VALUE = 1024

__all__ = [
    "BRANCH_MODES", "ID_PATTERN", "IMAGE_NAME_PATTERN", "MAX_ARGV", "MAX_CHILDREN", "MAX_CODE_BYTES",
    "MAX_EXEC_OUTPUT", "MAX_EXEC_TIMEOUT_S", "MAX_EXPOSE", "MAX_LIFETIME_S", "MAX_METADATA", "MAX_METADATA_VALUE",
    "METADATA_KEY_PATTERN", "ORIGINAL_BRANCH_MODES", "MAX_MEMORY_LIMIT_MIB", "MAX_MEMORY_MIB", "MAX_PATH",
    "MAX_STDIN_BYTES", "MAX_TIMEOUT_S", "MAX_VCPUS", "MAX_WARM_CODE_BYTES", "MIN_MEMORY_LIMIT_MIB",
    "MIN_MEMORY_MIB", "MIN_VCPUS", "NETWORKS", "TAG_PATTERN",
]
