"""Thin absl entry points: they parse flags and call the library."""
