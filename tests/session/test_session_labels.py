"""A VM a user makes from a session's VM (Sandbox.fork / restore) is the user's, not
the session's: removing the session must not take it along.  (Restores used to copy
the source VM's ``torpor.session`` label, so ``Session.remove`` removed them.)"""

from __future__ import annotations

import pytest

from torpor.session import Session
from torpor.vmm.manager import VMManager

pytestmark = pytest.mark.vm


def test_a_sandbox_forked_from_a_session_outlives_its_removal(
    paths, tools_image, tmp_path
) -> None:
    dsn = str(tmp_path / "ctx.db")
    s = Session.create(image=tools_image, model="scripted:demo", paths=paths, dsn=dsn)
    kids = []
    try:
        kids = s.sandbox.fork(1)
        assert "torpor.session" not in kids[0].info().labels
        s.remove()
        alive = {v.id for v in VMManager(paths).list()}
        assert kids[0].id in alive, "removing the session removed the user's fork"
    finally:
        s.close()
        for kid in kids:
            kid.kill()
