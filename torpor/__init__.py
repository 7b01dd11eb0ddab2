"""torpor: durable AI-agent sessions on snapshotted QEMU microVMs."""

__version__ = "0.1.0"
