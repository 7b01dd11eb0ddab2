"""Thin Docker-like CLI over the library."""
