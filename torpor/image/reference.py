"""Docker-style image references: ``[registry/]repository[:tag][@sha256:digest]``.

Role: turn what a user typed into a canonical, comparable :class:`Reference`
and back into the short ("familiar") form Docker prints.

Invariants (the rules of ``github.com/distribution/reference``):

* The first ``/``-separated component is a registry only if it contains ``.``
  or ``:``, is ``localhost``, or has an upper-case letter; otherwise the
  registry is ``docker.io``.  ``index.docker.io`` is an alias of ``docker.io``.
* On ``docker.io`` a single-component repository gets the ``library/`` prefix.
* Repository components are lower case: ``[a-z0-9]+`` joined by ``.``, ``_``,
  ``__`` or runs of ``-``; the whole name is at most 255 characters.
* A tag is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; only ``sha256`` digests are
  accepted (64 lower-case hex digits).
* Without tag and digest the tag is ``latest``; with a digest and no tag the
  tag stays ``None`` (the digest alone names the content).

Malformed input raises :class:`~torpor.errors.UsageError` quoting the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from torpor.errors import UsageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
LEGACY_REGISTRY = "index.docker.io"
OFFICIAL_PREFIX = "library/"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_COMPONENT_RE = re.compile(_COMPONENT)
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
NAME_TOTAL_MAX = 255


@dataclass(frozen=True, order=True)
class Reference:
    """A parsed, normalized image reference (see the module docstring for the rules)."""

    registry: str
    repository: str
    tag: str | None = DEFAULT_TAG
    digest: str | None = None

    @property
    def name(self) -> str:
        """``registry/repository``: the canonical name without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The name as Docker prints it: ``alpine``, ``user/app``, ``localhost:5000/tools``."""
        if self.registry != DEFAULT_REGISTRY:
            return self.name
        if self.repository.startswith(OFFICIAL_PREFIX) and "/" not in self.repository[8:]:
            return self.repository[len(OFFICIAL_PREFIX) :]
        return self.repository

    @property
    def familiar(self) -> str:
        """Short form users type: ``tools:latest``, ``localhost:5000/tools:latest``."""
        return self.familiar_name + self._suffix()

    @property
    def pull_target(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        if not _DIGEST_RE.fullmatch(digest):
            raise UsageError(f"invalid digest {digest!r}")
        return replace(self, tag=None, digest=digest)

    def _suffix(self) -> str:
        out = f":{self.tag}" if self.tag else ""
        if self.digest:
            out += f"@{self.digest}"
        return out

    def __str__(self) -> str:
        return self.name + self._suffix()


def parse_reference(text: str) -> Reference:
    """Parse ``text`` with Docker's rules.  Raises UsageError quoting ``text`` if malformed."""

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid image reference {text!r}: {why}")

    if not isinstance(text, str) or not text:
        raise bad("empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise bad("contains whitespace")

    remainder = text
    digest: str | None = None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        if not _ANY_DIGEST_RE.fullmatch(digest):
            raise bad(f"malformed digest {digest!r}")
        if not _DIGEST_RE.fullmatch(digest):
            raise bad("only sha256 digests (64 lower-case hex digits) are supported")

    tag: str | None = None
    # A ':' after the last '/' separates the tag; earlier ones belong to a registry port.
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise bad(f"malformed tag {tag!r}")

    if not remainder:
        raise bad("missing repository name")
    if len(remainder) > NAME_TOTAL_MAX:
        raise bad(f"repository name longer than {NAME_TOTAL_MAX} characters")

    first, sep, rest = remainder.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first):
        registry, path = first, rest
        if not _DOMAIN_RE.fullmatch(registry):
            raise bad(f"malformed registry {registry!r}")
    else:
        registry, path = DEFAULT_REGISTRY, remainder
    if registry == LEGACY_REGISTRY:
        registry = DEFAULT_REGISTRY

    components = path.split("/")
    for comp in components:
        if not _COMPONENT_RE.fullmatch(comp):
            if comp.lower() != comp and _COMPONENT_RE.fullmatch(comp.lower()):
                raise bad("repository name must be lowercase")
            raise bad(f"malformed repository component {comp!r}")
    if registry == DEFAULT_REGISTRY and len(components) == 1:
        if _HEX64_RE.fullmatch(path):
            raise bad("cannot use a 64-character hexadecimal string as a repository name")
        path = OFFICIAL_PREFIX + path

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)
