"""The small-scale organisms fixture lives in tests/conftest.py (shared with the launcher tests)."""
