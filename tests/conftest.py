"""Shared fixtures: one torpor home per test session, the guest kernel, a real image.

Real parts only: VMs are real QEMU processes (TCG here), the image is built from
the host's busybox-static and imported through the real import path.  Every VM a
test creates is tracked and force-removed at teardown; when a test fails, the tail
of its VMs' console and shim logs is attached to the report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import pg_admin_dsn, pg_dsn  # noqa: F401  (fixtures for every folder)
from tests.s3fixtures import bucket, s3_env, s3_server  # noqa: F401  (one SeaweedFS, on first use)
from torpor.guest.kernel import find_kernels_dir
from torpor.paths import Paths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def torpor_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh TORPOR_HOME for the session, sharing the installed guest kernel.

    At the end, a VM still running in it (a test that leaked one) is named on stderr
    and removed, so a run never leaves QEMU processes behind (pytest keeps the home)."""
    home = tmp_path_factory.mktemp("home")
    paths = Paths(home).ensure()
    src = find_kernels_dir()
    if src is not None:
        shutil.copytree(src, paths.guest / "kernels", symlinks=True)
    else:
        from torpor.guest.kernel import fetch_kernel

        fetch_kernel(paths)
    os.environ["TORPOR_HOME"] = str(home)
    # no pool of spare VMs behind every hot restore of the suite (CPU and memory on a
    # 2-core box); tests/vm/test_pool.py turns it on where it is the subject
    os.environ.setdefault("TORPOR_POOL", "0")
    yield home
    _remove_leftover_vms(paths)


def _remove_leftover_vms(paths: Paths) -> None:
    from torpor.errors import TorporError
    from torpor.vmm import pool
    from torpor.vmm.manager import VMManager

    for root in (paths, *(Paths(p) for p in sorted((paths.root / "namespaces").glob("*")))):
        if not root.vms.is_dir():
            continue
        pool.drain(root)  # spare VMs are not VMs yet: `list` does not show them
        mgr = VMManager(root)
        for vm in mgr.list(all=True):
            if vm.state.status.active:
                print(
                    f"\nleaked VM {vm.name} ({vm.id[:12]}, labels {vm.config.labels})",
                    file=sys.stderr,
                )
                with contextlib.suppress(TorporError):
                    mgr.remove(vm.id, force=True)


@pytest.fixture(scope="session")
def paths(torpor_home: Path) -> Paths:
    return Paths(torpor_home)


@pytest.fixture(scope="session")
def tools_image(paths: Paths, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``tools:latest``: busybox imported as a rootfs tarball, like `docker import`."""
    from torpor.demo.image import write_busybox_rootfs
    from torpor.image.store import ImageStore

    tar = write_busybox_rootfs(tmp_path_factory.mktemp("img") / "tools.tar")
    ImageStore(paths).import_archive(tar, "tools:latest")
    return "tools:latest"


class VMs:
    """Factory for VMs that are always cleaned up."""

    def __init__(self, paths: Paths):
        from torpor.vmm.manager import VMManager

        self.mgr = VMManager(paths)
        self.ids: list[str] = []

    def run(self, image: str, *command: str, **kw: object):
        from torpor.vmm.manager import RunRequest

        kw.setdefault("memory_mib", 256)
        kw.setdefault("network", False)
        vm = self.mgr.create(RunRequest(image=image, command=command, **kw))  # type: ignore[arg-type]
        self.ids.append(vm.id)
        return self.mgr.start(vm.id)

    def logs_tail(self) -> str:
        out = []
        for vm_id in self.ids:
            d = self.mgr.paths.vm(vm_id)
            for name in ("console.log", "shim.log", "qemu.log"):
                p = d / name
                if p.exists():
                    tail = p.read_text(errors="replace").splitlines()[-15:]
                    out.append(f"--- {vm_id[:12]}/{name}\n" + "\n".join(tail))
        return "\n".join(out)

    def cleanup(self) -> None:
        from torpor.errors import TorporError

        for vm_id in self.ids:
            with contextlib.suppress(TorporError):
                self.mgr.remove(vm_id, force=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    _fail_skip(rep)  # defined below: skips are failures under scripts/test and CI
    if rep.failed:
        for name in ("vms", "shared_vms"):
            factory = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(factory, VMs):
                rep.sections.append(("VM logs", factory.logs_tail()))


# ---- skips are failures under scripts/test and in CI --------------------------------
#
# Everything a test needs (QEMU, the guest kernel, root, /dev/shm, docker-registry,
# PostgreSQL, every thesis peer including Restate) is provided by scripts/setup, so a
# skip there means a broken set-up or a bug hidden as a skip.  scripts/test (the
# README's test command, run by .ci/run) sets TORPOR_STRICT_SKIPS=1; CI=... does the
# same.  A plain `pytest tests/...` by hand stays lenient (a laptop without root, say).

STRICT_SKIPS = bool(os.environ.get("TORPOR_STRICT_SKIPS") or os.environ.get("CI"))

#: Deliberate skips, allowed even when strict: test node id (parameters included, or the
#: bare function id for every parameter) -> why the skip is right on a set-up machine.
#: Empty today: every skip in the suite is for something scripts/setup provides.
ALLOWED_SKIPS: dict[str, str] = {}


def _skip_allowed(nodeid: str) -> bool:
    return nodeid in ALLOWED_SKIPS or nodeid.split("[", 1)[0] in ALLOWED_SKIPS


def _fail_skip(rep: pytest.TestReport | pytest.CollectReport) -> None:
    if not (STRICT_SKIPS and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    if _skip_allowed(rep.nodeid):
        return
    where, why = "", str(rep.longrepr)
    if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        path, lineno, why = rep.longrepr
        where = f"{path}:{lineno}: "
    rep.outcome = "failed"
    rep.longrepr = (
        f"{where}{why}\nA skip is a failure under scripts/test and CI (TORPOR_STRICT_SKIPS / "
        "CI set): the set-up provides what this test needs.  If the skip is deliberate, "
        "add the test to ALLOWED_SKIPS in tests/conftest.py with the reason."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_skip(outcome.get_result())  # a module-level skip or importorskip


@pytest.fixture
def vms(paths: Paths) -> Iterator[VMs]:
    f = VMs(paths)
    yield f
    f.cleanup()


@pytest.fixture(scope="session")
def shared_vms(paths: Paths) -> Iterator[VMs]:
    f = VMs(paths)
    yield f
    f.cleanup()


@pytest.fixture(scope="session")
def box(shared_vms: VMs, tools_image: str):
    """One long-running VM shared by the tests that only exec in it."""
    return shared_vms.run(tools_image, "sleep", "infinity", name="shared-box")


def torpor_cli(
    *args: str, input: bytes | None = None, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``torpor`` CLI in a subprocess."""
    e = dict(os.environ)
    e.update(env or {})
    e.pop("TORPOR_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=e,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


# ---- two workers (scripts/test: pytest-xdist -n 2) --------------------------------
#
# The VM tests are TCG-bound and tuned to run one at a time: they all go, in their
# usual order, to one worker; every other test (servers, stores, parsers, fuzzers:
# mostly waiting, not computing) goes to the other and runs meanwhile.  Each worker
# has its own session fixtures (home, image, PostgreSQL, SeaweedFS): nothing is
# shared between the two.  A test boots VMs if it uses a VM fixture or carries the
# ``vm`` marker.  (xdist's own ``--dist loadgroup`` cannot do it: with pytest 9 the
# group it writes into ``item._nodeid`` is lost, and every test ran on either worker.)
# The workers write the VM tests' ids to a file the scheduler (in the controller) reads.

VM_FIXTURES = frozenset({"tools_image", "vms", "shared_vms", "box"})
_VM_IDS_ENV = "TORPOR_TEST_VM_IDS"


def boots_vms(item: pytest.Item) -> bool:
    return bool(VM_FIXTURES & set(getattr(item, "fixturenames", ()))) or (
        item.get_closest_marker("vm") is not None
    )


def pytest_configure(config: pytest.Config) -> None:
    # the controller, before it starts the workers (they inherit the environment)
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        import tempfile

        fd, name = tempfile.mkstemp(prefix="torpor-vm-tests-", suffix=".json")
        os.close(fd)
        os.environ[_VM_IDS_ENV] = name


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and os.environ.get(_VM_IDS_ENV):
        with contextlib.suppress(OSError):
            os.unlink(os.environ.pop(_VM_IDS_ENV))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    target = os.environ.get(_VM_IDS_ENV)
    if not target or not hasattr(config, "workerinput"):
        return
    from torpor.fsutil import atomic_write_json  # both workers write the same list

    atomic_write_json(Path(target), sorted(item.nodeid for item in items if boots_vms(item)))


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: no error without it (-p no:xdist)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Two units of work, "vm" and "host", one per worker, each in collection order."""
    import json

    from xdist.scheduler import LoadScopeScheduling

    class VMSplit(LoadScopeScheduling):
        _vm: frozenset[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._vm is None:  # read once every worker has collected (and written)
                self._vm = frozenset(json.loads(Path(os.environ[_VM_IDS_ENV]).read_text()))
            return "vm" if nodeid in self._vm else "host"

    return VMSplit(config, log)
