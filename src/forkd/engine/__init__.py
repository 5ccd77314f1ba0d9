"""The engine: guest-independent VM mechanics (QEMU processes, snapshots, copy-on-write children, pools)."""

from forkd.engine.child import Child, ExecResult
from forkd.engine.engine import Engine, SpawnResult
from forkd.engine.snapshot import Snapshot, SnapshotStore

__all__ = ["Child", "Engine", "ExecResult", "Snapshot", "SnapshotStore", "SpawnResult"]
