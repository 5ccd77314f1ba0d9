"""Hostile-guest tests: each does from inside a sandbox what an attacker would (fixtures: tests/conftest.py)."""
