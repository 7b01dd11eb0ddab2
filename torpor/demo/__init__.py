"""The demo: what `scripts/demo` and `torpor demo` run."""
