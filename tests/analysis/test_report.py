"""The analysis report: plots are real PNGs, report.html is self-contained, escaped and carries the numbers."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from neurodiff_jax.analysis import report

PNG = b"\x89PNG\r\n\x1a\n"
RULE = (0.2, 0.5)
# Latents 0-6 chat-only (6 without ν), 7-10 base-only, 11-30 shared, 31-35 other, 36-39 dead.
TAGS = ["chat_only"] * 7 + ["base_only"] * 4 + ["shared"] * 20 + ["other"] * 5 + ["dead"] * 4
NU_ERROR_CHAT = [0.05, 0.1, 0.3, 0.15, 0.9, 0.01, np.nan]
NU_RECON_CHAT = [0.1, 0.7, 0.2, 0.3, 0.9, 0.4, np.nan]
SHARE_CHAT = [0.9, 0.8, 0.1, 0.7, 0.2, 0.6, 0.95]
CONTEXT = ["Hello", " <b>", " world", "\n", " & co"]


def _latents() -> pd.DataFrame:
  rng = np.random.default_rng(0)
  m = len(TAGS)
  tag = np.asarray(TAGS, dtype=object)
  dn = np.where(tag == "chat_only", rng.uniform(0.91, 1.0, m),
                np.where(tag == "base_only", rng.uniform(0.0, 0.09, m),
                         np.where(tag == "shared", rng.uniform(0.41, 0.59, m), rng.uniform(0.65, 0.85, m))))
  live = tag != "dead"
  ne, nr = rng.uniform(0.05, 2.0, m), rng.uniform(0.05, 2.0, m)
  ne[:7], nr[:7] = NU_ERROR_CHAT, NU_RECON_CHAT
  ne[12] = -0.3  # a negative ratio: the scatter must fall back from log axes
  share = rng.uniform(0, 1, m)
  share[:7] = SHARE_CHAT
  t = pd.DataFrame({"latent": np.arange(m, dtype=np.int64), "dec_norm_base": rng.uniform(0.1, 1, m),
                    "dec_norm_chat": rng.uniform(0.1, 1, m), "delta_norm": dn, "tag": tag.astype(str),
                    "dec_cos": rng.uniform(-1, 1, m), "enc_norm_base": rng.uniform(0.1, 1, m),
                    "enc_norm_chat": rng.uniform(0.1, 1, m), "freq": np.where(live, rng.uniform(1e-4, 0.1, m), 0.0),
                    "max_act": np.where(live, rng.uniform(1, 10, m), np.nan)})
  for col in ("beta_recon_base", "beta_recon_chat", "beta_error_base", "beta_error_chat", "beta_act_base",
              "beta_act_chat"):
    t[col] = np.where(live, rng.uniform(0, 1, m), np.nan)
  t["nu_recon"] = np.where(live, nr, np.nan)
  t["nu_error"] = np.where(live, ne, np.nan)
  t["template_share"] = np.where(live, share, np.nan)
  known = (tag == "chat_only") & np.isfinite(t["nu_error"]) & np.isfinite(t["nu_recon"])
  genuine = pd.array([None] * m, dtype="boolean")
  genuine[known.to_numpy()] = ((t["nu_error"] < RULE[0]) & (t["nu_recon"] < RULE[1]))[known].to_numpy()
  t["genuine"] = genuine
  rank = np.full(m, np.nan)
  rank[known] = t.loc[known, "nu_error"].rank().to_numpy() + t.loc[known, "nu_recon"].rank().to_numpy()
  t["nu_rank"] = rank
  half = np.full(m, "", dtype=object)
  order = np.flatnonzero(known)[np.argsort(rank[known], kind="stable")]
  half[order[: len(order) // 2]], half[order[len(order) // 2:]] = "best", "worst"
  t["nu_half"] = half.astype(str)
  return t


def _examples(latents: list[int]) -> pd.DataFrame:
  rows = []
  for j in latents:
    groups = [("top", r, 5.0 - r) for r in range(3)] + [(f"q{q}", 0, float(q)) for q in range(1, 5)]
    for group, rank, act in groups:
      rows.append({"latent": j, "group": group, "rank": rank, "activation": act, "token": 100 * j + rank,
                   "doc_index": 3, "position": 7, "dataset": "chat.jsonl", "token_id": 42, "context_tokens": CONTEXT,
                   "context_acts": [0.0, act, act / 2, 0.0, 0.1], "context_index": 1})
  return pd.DataFrame(rows)


def _causal() -> pd.DataFrame:
  rows = []
  kl = {"all_base": 1.0, "all_latents": 0.1, "nu_best_half": 0.4, "nu_worst_half": 0.8, "template_chat": 0.9}
  for k, (group, v) in enumerate(kl.items()):
    for r, region in enumerate(("reply", "first", "rest")):
      mean = v + 0.01 * r
      rows.append({"group": group, "region": region, "kl_mean": mean, "ci_low": mean - 0.05, "ci_high": mean + 0.05,
                   "n_tokens": 500 + r, "n_docs": 20, "n_latents": -1 if group == "template_chat" else 3 * k})
  return pd.DataFrame(rows)


def _write_png(path: Path) -> None:
  from matplotlib.figure import Figure

  fig = Figure(figsize=(2, 2), dpi=50)
  fig.subplots().bar([0, 1], [1, 2])
  fig.savefig(path, format="png")


@pytest.fixture()
def results(tmp_path: Path) -> Path:
  """A results directory as analyze.py writes it, every optional file present."""
  table = _latents()
  table.to_parquet(tmp_path / "latents.parquet", index=False)
  _examples([0, 3, 5, 7, 20]).to_parquet(tmp_path / "examples.parquet", index=False)
  _causal().to_parquet(tmp_path / "causal.parquet", index=False)
  _write_png(tmp_path / "causal.png")
  pd.DataFrame([{"latent": j, "model": who, "prompt": "Who are you?", "strength": 2.0 * mult, "multiple": mult,
                 "completion": f"I am <script>alert({j})</script> & more"}
                for j in (5, 20) for who in ("chat", "base") for mult in (0.0, 2.0)]).to_parquet(
      tmp_path / "steering.parquet", index=False)
  pd.DataFrame([{"latent": 0, "direction": d, "rank": r, "token": f"<{d[:3]}{r}>", "logit": (1 if d == "promoted" else -1)
                 * (3.0 - r)} for d in ("promoted", "suppressed") for r in range(3)]).to_parquet(
      tmp_path / "logit_lens.parquet", index=False)
  summary = {"workdir": "/runs/tiny_l1", "checkpoint_step": 1000, "store": "/stores/chat", "layer": 2,
             "sparsity": "l1", "dict_size": len(table), "k": 0, "tokens": 123456,
             "models": [{"role": "base", "path": "/m/base-model"}, {"role": "chat", "path": "/m/chat-model"}],
             "classes": {}, "genuine": {"rule": f"nu_error < {RULE[0]} and nu_recon < {RULE[1]}"},
             "template": {"template_token_fraction": 0.25}, "nu_error_auc": 0.875}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  return tmp_path


def _num(page: str, key: str) -> str:
  hit = re.search(rf'data-key="{key}">([^<]*)<', page)
  assert hit, f"no number {key!r} in the report"
  return hit.group(1)


def _check_self_contained(page: str, n_images: int) -> None:
  srcs = re.findall(r'src="([^"]*)"', page)
  assert len(srcs) == n_images and all(s.startswith("data:image/png;base64,") for s in srcs)
  for s in srcs:
    assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG)
  low = page.lower()
  for bad in ('src="http', 'href="http', "<script", "<link", "url(", "@import"):
    assert bad not in low, bad


def test_plots_are_pngs(results: Path):
  paths = report.make_plots(results)
  assert set(paths) == {"delta_norm", "latent_scaling", "template_share"}
  for name, path in paths.items():
    assert path == results / f"{name}.png"
    assert path.read_bytes()[:8] == PNG
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_report_numbers_images_and_escaping(results: Path):
  table = pd.read_parquet(results / "latents.parquet")
  report.make_plots(results)
  page = report.write_report(results, max_latents=4).read_text(encoding="utf-8")
  # classes, counted here from the tags the fixture wrote
  for tag in ("chat_only", "base_only", "shared", "other", "dead"):
    hit = re.search(rf'data-class="{tag}">.*?class="count">(\d+)<', page)
    assert hit and int(hit.group(1)) == TAGS.count(tag), tag
  assert _num(page, "live") == str(len(TAGS) - TAGS.count("dead"))
  # The analysis's dead latents are "never fired", never training's "dead fraction" (another quantity).
  assert _num(page, "never_fired") == str(TAGS.count("dead"))
  assert "dead fraction" not in page
  # the latent-scaling verdict, from the rule applied here to the planted ν
  ne, nr = np.asarray(NU_ERROR_CHAT), np.asarray(NU_RECON_CHAT)
  known = np.isfinite(ne) & np.isfinite(nr)
  assert _num(page, "chat_only_live") == "7"
  assert _num(page, "with_nu") == str(known.sum()) == "6"
  assert _num(page, "genuine") == str(((ne < 0.2) & (nr < 0.5))[known].sum()) == "3"
  assert _num(page, "shrinkage") == str((ne[known] >= 0.2).sum())
  assert _num(page, "decoupling") == str((nr[known] >= 0.5).sum())
  assert "nu_error_auc" in page and "0.875" in page
  assert _num(page, "chat_only_mostly_template") == str(sum(s > 0.5 for s in SHARE_CHAT))
  # the causal table with intervals, and the verdict from its numbers
  causal = _causal().set_index(["group", "region"])
  for group in ("all_base", "nu_best_half", "nu_worst_half"):
    c = causal.loc[(group, "first")]
    assert f"{c.kl_mean:.3g} [{c.ci_low:.3g}, {c.ci_high:.3g}]" in page
  assert "the best half brings the model closer" in page and "do not overlap" in page
  assert "closes 66.7%" in page  # (1.0 - 0.4) / (1.0 - 0.1) of the all-base to all-latents gap
  # setup
  assert "chat-model vs base-model" in page and "123,456" in page
  # cards: chat-only latents with examples by ν rank, then the base-only one, then the steered shared latent
  cards = [int(j) for j in re.findall(r'class="card" id="latent-(\d+)"', page)]
  chat = table[table["latent"].isin([0, 3, 5])].sort_values("nu_rank")["latent"].tolist()
  assert cards == chat + [7, 20]
  # decoded tokens and completions are escaped, the firing token is outlined
  assert "&lt;b&gt;" in page and "<b>" not in page
  assert "&lt;script&gt;alert(5)&lt;/script&gt; &amp; more" in page
  assert "&amp; co" in page
  card0 = page[page.index('id="latent-0"'):page.index("</div>", page.index("Logit lens"))]
  assert "&lt;pro0&gt;</code> (3)" in card0 and "&lt;sup2&gt;</code> (-1)" in card0
  assert card0.index("Top 3 activations") < card0.index("quantile 4 of 4") < card0.index("Logit lens")
  fired = re.findall(r'<span class="tok fire"[^>]*>([^<]*)</span>', page)
  assert fired and set(fired) == {" &lt;b&gt;"}
  _check_self_contained(page, n_images=4)  # 3 plots + causal.png


def test_report_without_optional_files(results: Path):
  for name in ("examples.parquet", "causal.parquet", "causal.png", "steering.parquet", "summary.json",
               "logit_lens.parquet"):
    (results / name).unlink()
  path = report.write_report(results)  # makes the plots itself when they are missing
  page = path.read_text(encoding="utf-8")
  assert all((results / f"{p}.png").is_file() for p in report.PLOTS)
  assert "Not run" in page
  assert _num(page, "genuine") == "3"
  # no examples: the picks fall back to every live latent (chat-only by rank, 2 base-only, then highest Δnorm)
  cards = [int(j) for j in re.findall(r'class="card" id="latent-(\d+)"', page)]
  assert len(cards) == 8 and cards[-2:] == [j for j in cards if TAGS[j] == "base_only"]
  assert "No decoded contexts" in page
  _check_self_contained(page, n_images=3)


def test_no_chat_only_latents(tmp_path: Path):
  table = _latents()
  table.loc[table["tag"] == "chat_only", "tag"] = "other"
  table["genuine"] = pd.array([None] * len(table), dtype="boolean")
  table["nu_rank"] = np.nan
  table.to_parquet(tmp_path / "latents.parquet", index=False)
  paths = report.make_plots(tmp_path)
  assert all(p.read_bytes()[:8] == PNG for p in paths.values())
  page = report.write_report(tmp_path).read_text(encoding="utf-8")
  assert "No live latent is chat-only" in page
  _check_self_contained(page, n_images=3)


def test_more_than_two_models(tmp_path: Path):
  table = _latents()
  pairwise = ["dec_norm_chat", "delta_norm", "tag", "dec_cos", "enc_norm_chat", "beta_recon_base", "beta_recon_chat",
              "beta_error_base", "beta_error_chat", "beta_act_base", "beta_act_chat", "nu_recon", "nu_error",
              "genuine", "nu_rank", "nu_half"]
  wide = table.rename(columns={c: (c.replace("_chat", "_m1") if c.endswith("norm_chat") else f"{c}_m1")
                               for c in pairwise})
  wide["tag_m2"] = "shared"  # a second fine-tuned model; the report reads model 1
  wide.to_parquet(tmp_path / "latents.parquet", index=False)
  pd.testing.assert_frame_equal(report.read_table(tmp_path)[table.columns], table)
  page = report.write_report(tmp_path).read_text(encoding="utf-8")
  assert _num(page, "genuine") == "3"


def test_missing_table_and_rule():
  with pytest.raises(report.ReportError, match="launch.analyze"):
    report.read_table("/nonexistent/results")
  assert report.genuine_rule({"genuine": {"rule": "nu_error < 0.3 and nu_recon < 0.75"}}) == (0.3, 0.75)
  assert report.genuine_rule({}) == report.DEFAULT_RULE
  assert list(report.genuine_values(pd.Series(pd.array([True, False, None], dtype="boolean")))[:2]) == [1.0, 0.0]
  assert np.isnan(report.genuine_values(pd.Series([None, np.nan], dtype=object))).all()


def test_escape_and_format():
  assert report.esc('<b>"x"&') == "&lt;b&gt;&quot;x&quot;&amp;"
  assert report.fmt(np.nan) == "–" and report.fmt(0.123456) == "0.123" and report.fmt(12345) == "12,345"
