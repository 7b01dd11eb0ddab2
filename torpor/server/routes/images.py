"""``/v1/images``: the tenant's image store over HTTP (docs/api.md is the contract).

The same :class:`~torpor.image.store.ImageStore` calls as ``torpor images`` /
``pull`` / ``import`` / ``rmi``, on the tenant's home.

Invariants:

- An import's body streams to a private temporary file under the tenant's
  ``tmp`` folder (capped by the server's upload limit, 413 beyond), which the
  library then imports with all its checks (an archive is hostile input); the
  file is removed whatever happens.
- A pull uses only the credentials given in its body, never the server's own
  (``TORPOR_REGISTRY_USER``/``PASSWORD``): a tenant names the registry, and the
  operator's secrets must not be sent to a host a tenant chose.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Query, Request

from torpor.errors import UsageError
from torpor.server.deps import TenantDep
from torpor.server.sandbox_schemas import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    ImageList,
    ImageOut,
    PullIn,
    RemovedOut,
    page,
)

router = APIRouter(tags=["images"])


def _out(im: Any) -> ImageOut:
    return ImageOut(
        id=im.id,
        repo_tags=list(im.repo_tags),
        repo_digests=list(im.repo_digests),
        created=im.created.isoformat() if im.created else None,
        size=im.size,
        layers=len(im.layers),
    )


def _store(t: Any) -> Any:
    from torpor.image.store import ImageStore

    return ImageStore(t.paths.ensure())


@router.get("/v1/images", response_model=ImageList)
def list_(
    t: TenantDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> ImageList:
    """Every image, newest first."""
    imgs = [(-(im.created.timestamp() if im.created else 0.0), im) for im in _store(t).list()]
    imgs.sort(key=lambda x: (x[0], x[1].id))
    items, nxt = page(imgs, lambda x: [x[0], x[1].id], limit, cursor)
    return ImageList(items=[_out(im) for _, im in items], next_cursor=nxt)


@router.post("/v1/images/pull", status_code=201, response_model=ImageOut)
def pull(body: PullIn, t: TenantDep) -> ImageOut:
    """Pull ``ref`` from an OCI / Docker v2 registry (``insecure``: plain HTTP)."""
    if "\0" in body.ref:
        raise UsageError("an image reference must not contain NUL bytes")
    im = _store(t).pull(
        body.ref,
        # "" (not None): the library would fall back to the server's own credentials
        username=body.username or "",
        password=body.password or "",
        insecure=body.insecure,
    )
    return _out(im)


@router.post(
    "/v1/images/import",
    status_code=201,
    response_model=ImageOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def import_(
    request: Request,
    t: TenantDep,
    name: Annotated[
        str | None, Query(max_length=512, description="repo[:tag] for the image")
    ] = None,
) -> ImageOut:
    """Import the uploaded archive (``docker save``, OCI layout or rootfs tarball)."""
    if name is not None and "\0" in name:
        raise UsageError("an image name must not contain NUL bytes")
    paths = t.paths.ensure()
    paths.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".tar", dir=paths.tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                await to_thread.run_sync(f.write, chunk)
        if os.path.getsize(tmp) == 0:
            raise UsageError("the upload is empty: send the archive as the request body")
        im = await to_thread.run_sync(lambda: _store(t).import_archive(Path(tmp), name or None))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return _out(im)


@router.delete("/v1/images/{ref:path}", response_model=RemovedOut)
def remove(
    ref: str,
    t: TenantDep,
    force: Annotated[bool, Query(description="even if a VM uses it")] = False,
) -> RemovedOut:
    """Remove a name (``repo:tag``), or the image by id; the image goes with its last
    name.  409 if a VM uses it (unless ``force``)."""
    from torpor.vmm.manager import VMManager

    store = _store(t)
    image_id = store.get(ref).id
    done = store.remove(ref, force=force, in_use=VMManager(t.paths).in_use)
    return RemovedOut(id=image_id, done=done)
