"""The guest side of forkd: the initramfs image builder, its cpio writer, /init and the PID-1 agent."""
