"""One module per resource; each exposes ``router`` (see torpor.server.app.ROUTERS)."""
