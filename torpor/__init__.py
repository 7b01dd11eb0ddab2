"""torpor: durable AI-agent sessions on snapshotted QEMU microVMs."""

__version__ = "0.1.0"

__all__ = ["Sandbox", "Session", "__version__"]


def __getattr__(name: str) -> object:
    # `from torpor import Session` without importing the VM stack for `torpor --help`
    if name == "Session":
        from torpor.session import Session

        return Session
    if name == "Sandbox":
        from torpor.sandbox import Sandbox

        return Sandbox
    raise AttributeError(f"module 'torpor' has no attribute {name!r}")
