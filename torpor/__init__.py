"""torpor: durable AI-agent sessions on snapshotted QEMU microVMs."""

__version__ = "0.1.0"

__all__ = ["Client", "Sandbox", "Session", "Tool", "__version__", "tool"]


def __getattr__(name: str) -> object:
    # `from torpor import Session` without importing the VM stack for `torpor --help`
    if name == "Session":
        from torpor.session import Session

        return Session
    if name == "Sandbox":
        from torpor.sandbox import Sandbox

        return Sandbox
    if name == "Client":  # the same Sandbox and Session, through a server (torpor.client)
        from torpor.client import Client

        return Client
    if name in ("Tool", "tool"):  # custom tools for a session's model
        from torpor.session import tools

        return getattr(tools, name)
    raise AttributeError(f"module 'torpor' has no attribute {name!r}")
