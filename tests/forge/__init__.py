"""Forge adapter tests (a package, so that its conftest and helpers do not clash with those of tests/adapter)."""
