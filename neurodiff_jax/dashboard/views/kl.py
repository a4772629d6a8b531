"""Per-token KL: where the fine-tuned and the base model's next-token distributions differ (`launch.diff`'s `kl`).

Query parameter `diff=NAME` picks the diff result (a name not in the root is refused with the root's diff results).
Reads `diff/kl/`: kl_summary.parquet (statistics by token kind), kl_by_position.parquet (mean KL per position) and
kl_top_contexts.parquet (the contexts of the highest-KL tokens). The contexts are text coloured by the KL at each token
(`context_kl`; files written before that column existed colour the marked token only, and the page names the rerun),
the token whose prediction differs most boxed (`class="firing"`); a browser opens one context with both models' top
next tokens and the KL of each of its tokens.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard.views import diff_table, fmt, pick_diff, tokens_html
from neurodiff_jax.dashboard.results import DiffResult, ResultsRoot, diff_command

SHOWN = 20  # contexts drawn as coloured text at once


def context_kls(row: pd.Series | dict) -> list[float]:
  """The KL at each token of a top context: `context_kl`, else (older files) NaN except the marked token's."""
  tokens = list(row["context_tokens"])
  values = row.get("context_kl")
  if values is not None and not (isinstance(values, float) and np.isnan(values)) and len(values) == len(tokens):
    return [float(v) for v in values]
  out = [float("nan")] * len(tokens)
  out[int(row["marked"])] = float(row["kl"])
  return out


def kl_html(tokens: list[str], kls: list[float], marked: int, scale: float) -> str:
  """One context as HTML: each token's background by its KL / `scale` (hover: its KL), the marked token boxed."""
  return tokens_html(tokens, kls, marked, scale, rgb="200, 30, 30", border="#000", div_class="kl-context",
                     title=lambda v: f"KL {v:.4f}" if np.isfinite(v) else "KL not stored")


def contexts_table(top: pd.DataFrame) -> pd.DataFrame:
  """The top contexts as a table: rank, KL, where, the marked token, the actual next token, both models' top next."""
  return pd.DataFrame({
      "rank": np.arange(1, len(top) + 1), "kl": top["kl"].to_numpy(np.float64), "doc": top["doc"].astype(int),
      "position": top["position"].astype(int), "token": [repr(t) for t in top["token"]],
      "next token": [repr(t) for t in top["next_token"]],
      "fine-tuned top (p)": [f"{t!r} ({p:.3f})" for t, p in zip(top["top_ft"], top["p_top_ft"])],
      "base top (p)": [f"{t!r} ({p:.3f})" for t, p in zip(top["top_base"], top["p_top_base"])]})


def position_chart(profile: pd.DataFrame) -> alt.Chart:
  """Mean KL by position (integer ticks), with the token count in the tooltip."""
  return alt.Chart(profile, title="mean KL by position").mark_line(point=True).encode(
      x=alt.X("position:Q", title="position in document", axis=alt.Axis(format="d", tickMinStep=1)),
      y=alt.Y("mean_kl:Q", title="mean KL(P_ft ‖ P_base), nats"),
      tooltip=[alt.Tooltip("position:Q", format="d"), alt.Tooltip("mean_kl:Q", format=".4f"),
               alt.Tooltip("n_tokens:Q", title="tokens")]).properties(height=260).interactive()


def render_diff(diff: DiffResult) -> None:
  """One diff result's per-token KL."""
  pair = diff.pair()
  st.caption(f"KL(P_ft ‖ P_base) of the next-token distributions of `{pair.get('finetuned')}` and `{pair.get('base')}` "
             f"at every token of {', '.join(map(str, pair.get('datasets', [])))}, in nats.")
  if "kl" not in diff.methods:
    st.info(f"No per-token KL in {diff.diff_dir}: `{diff_command(diff.path, pair)} --config.methods='(\"kl\",)'`")
    return
  summary = diff_table(diff, "kl", "kl_summary.parquet")
  every = summary[summary["kind"].astype(str) == "all"]
  if len(every):
    a = every.iloc[0]
    cols = st.columns(5)
    for col, (label, key) in zip(cols, (("tokens", "n_tokens"), ("mean KL", "mean"), ("median", "median"),
                                        ("p99", "p99"), ("max", "max"))):
      col.metric(label, fmt(a[key]) if key != "n_tokens" else f"{int(a[key]):,}")
  st.subheader("By token kind")
  st.dataframe(summary, hide_index=True, key="kl_summary")
  if diff.has("kl", "kl_by_position.parquet"):
    st.altair_chart(position_chart(diff_table(diff, "kl", "kl_by_position.parquet")), width="stretch")
  if not diff.has("kl", "kl_top_contexts.parquet"):
    return
  top = diff_table(diff, "kl", "kl_top_contexts.parquet").sort_values("kl", ascending=False, kind="stable")
  top = top.reset_index(drop=True)
  if top.empty:
    st.info("No top contexts stored (kl.top_contexts = 0).")
    return
  st.subheader("Where the models disagree most")
  if "context_kl" not in top.columns:
    st.warning("These contexts were written before the KL of every token was stored: only the marked token is "
               f"coloured. Rerun `{diff_command(diff.path, pair)} --config.force_methods='(\"kl\",)'` to colour them.")
  kls = [context_kls(r) for r in top.to_dict(orient="records")]
  scale = float(np.nanmax([np.nanmax(k) if np.isfinite(k).any() else 0.0 for k in kls]))
  st.caption(f"The {min(SHOWN, len(top))} contexts of highest KL: each token's background by the KL of the model's "
             f"prediction after it (darkest: {scale:.3g} nats; hover for the value), the token where the two models "
             "differ most boxed.")
  with st.container(key="kl_contexts_html"):
    st.html("".join(f'<div class="kl-example" style="margin-bottom: 0.4em;"><small>#{i + 1} · KL {fmt(r.kl)} · doc '
                    f"{int(r.doc)}:{int(r.position)}</small>{kl_html(list(r.context_tokens), kls[i], int(r.marked), scale)}"
                    "</div>" for i, r in enumerate(top.head(SHOWN).itertuples())))
  st.dataframe(contexts_table(top), hide_index=True, key="kl_contexts")
  st.subheader("Browse a context")
  i = st.selectbox("context", list(range(len(top))), key="kl_context",
                   format_func=lambda k: f"#{k + 1}: KL {top['kl'].iloc[k]:.3f} at {top['token'].iloc[k]!r}")
  r = top.iloc[int(i)]
  with st.container(border=True, key="kl_context_one"):
    st.html(kl_html(list(r["context_tokens"]), kls[int(i)], int(r["marked"]), scale))
    c1, c2, c3 = st.columns(3)
    c1.metric("actual next token", repr(r["next_token"]))
    c2.metric("fine-tuned model's top next", repr(r["top_ft"]), f"p = {float(r['p_top_ft']):.3f}", delta_color="off")
    c3.metric("base model's top next", repr(r["top_base"]), f"p = {float(r['p_top_base']):.3f}", delta_color="off")
  st.dataframe(pd.DataFrame({"token": [repr(t) for t in r["context_tokens"]], "KL": kls[int(i)]}), hide_index=True,
               key="kl_context_tokens")


def render(root: ResultsRoot) -> None:
  """The per-token KL page."""
  st.title("Per-token KL")
  diff = pick_diff(root, "kl_diff", "the per-token KL")
  if diff is not None:
    render_diff(diff)


__all__ = ["context_kls", "contexts_table", "kl_html", "position_chart", "render", "render_diff"]
