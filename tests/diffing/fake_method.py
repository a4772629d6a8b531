"""A stand-in method for the runner's tests: counts its calls and writes a section."""

from pathlib import Path

CALLS = []


def run(ctx, cfg, out: Path) -> dict:
  """Records the call; fails when told to (a killed method)."""
  CALLS.append(str(out))
  if cfg.get("fail", False):
    raise KeyboardInterrupt  # as a kill would
  n = sum(int(b.mask[b.docs >= 0].sum()) for b in ctx.batches(4))
  (out / "section.html").write_text(f"<h2>fake</h2><p>{n} tokens</p>")
  return {"tokens": n}
