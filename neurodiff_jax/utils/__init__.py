"""Small helpers shared by every package (paths, progress)."""
