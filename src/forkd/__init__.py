"""forkd: fork warmed QEMU microVMs copy-on-write, for AI-agent fan-out."""

__version__ = "0.1.0"
