"""``python -m torpor.bench.thesis`` = ``torpor bench thesis``."""

from torpor.bench.thesis.cli import thesis

thesis()
