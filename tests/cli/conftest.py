"""Fixtures for the CLI tests: the real SeaweedFS of tests/store (started only by a
test that asks for it)."""

from tests.store.conftest import bucket, s3_server  # noqa: F401
