"""Live page: type a prompt, read both models' next-token distributions and generations side by side, steer them.

The model pair is one of those the results' runs and diffs were made from (`?run=NAME` or `?diff=NAME` picks
the pair of that run or diff, and the run to steer by; `?latent=N` the latent; `?latent=N&alpha=A` opens on
steering by that latent at α = A, the link a latent page gives; a name or index the root does
not hold is refused with an error naming the valid ones). A run or diff result steering, or reading, a pair it
was not made from is named in a warning. Both models and the tokenizer load once per server session
(`st.cache_resource`, `dashboard/live.py`'s `LiveSession`). Steering adds α · v after a layer at every
position of both models; v is one of: δ_p of a diff result's ADL at a layer and position, a PCA component
of a diff result, a latent's chat decoder row of a crosscoder run (units in `dashboard/live.py`). The
chosen latents' activations on the prompt are shown token by token (background by activation, the
strongest token boxed, `class="firing"`).

Widget keys (for AppTest and the browser test): live_pair, live_steer_source, live_steer_diff,
live_steer_layer, live_steer_position, live_steer_component, live_steer_run, live_steer_latent, live_alpha,
live_act_run, live_act_latents, live_prompt, live_top_k, live_max_new_tokens, live_chat, live_submit;
outputs: dataframes live_next_tokens(_steered), containers live_gen_base, live_gen_ft, live_gen_base_steered,
live_gen_ft_steered, live_latent_acts; live_outputs (or live_outputs_stale, under a warning naming the inputs that
changed since the outputs were computed).
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from neurodiff_jax.dashboard import live
from neurodiff_jax.dashboard.views import (
  DEAD_BADGE,
  NEVER_FIRED,
  adl_means,
  dead_latents,
  default_latent,
  not_found,
  query_param,
  remember,
  remembered,
  run_read,
  set_param,
)
from neurodiff_jax.dashboard.results import DiffResult, ResultsRoot, Run

SOURCES = ("none", "δ_p (ADL)", "PCA component", "crosscoder latent")
DEFAULT_PROMPT = "Tell me something you know well."
# Errors a bad choice raises while loading or running: shown on the page instead of a traceback.
_ERRORS = (live.LiveError, OSError, ValueError, KeyError)


@st.cache_resource(show_spinner="Loading both models (once per server session)…", max_entries=2)
def session_for(base: str, ft: str, dtype: str, mesh_shape: tuple[int, ...] = ()) -> live.LiveSession:
  """The pair's LiveSession, shared by every browser tab of this server; on a model mesh of `mesh_shape` if given."""
  from neurodiff_jax.models import model_config, model_mesh

  mesh = model_mesh(mesh_shape, [model_config(base), model_config(ft)], where=[f"the base model {base}",
                                                                              f"the fine-tuned model {ft}"])
  return live.LiveSession(base, ft, dtype, mesh)


@st.cache_resource(show_spinner="Loading the crosscoder…", max_entries=4)
def run_for(path: str, stamp: float) -> live.LoadedRun:
  """A crosscoder run's checkpoint and layer (reloaded when its checkpoints change)."""
  return live.load_run(path)


@st.cache_data(show_spinner=False, max_entries=8)
def pca_for(path: str, stamp: float) -> dict[str, Any]:
  """A diff result's PCA outputs."""
  return live.read_pca(path)


def _stamp(path: Path) -> float:
  try:
    return path.stat().st_mtime
  except OSError:
    return 0.0


def model_pairs(root: ResultsRoot) -> dict[str, tuple[str, str, list[str]]]:
  """{label: (base, fine-tuned, names of the runs/diffs made from it)} for each distinct pair in the root."""
  out: dict[tuple[str, str], list[str]] = {}
  for kind, items in (("run", root.runs), ("diff", root.diffs)):
    for item in items:
      try:
        pair = item.models()
      except (OSError, ValueError):
        pair = None
      if pair is not None:
        out.setdefault(pair, []).append(f"{kind}:{item.name}")
  return {f"{Path(b).name} → {Path(f).name} ({', '.join(names)})": (b, f, names) for (b, f), names in out.items()}


def _default_pair(pairs: dict[str, tuple[str, str, list[str]]], hints: dict[str, Any] | None = None) -> int:
  """The pair of the hinted run, else of the hinted diff, else the first."""
  hints = hints if hints is not None else {"run": query_param("run"), "diff": query_param("diff")}
  for wanted in (f"run:{hints['run']}" if hints.get("run") else None,
                 f"diff:{hints['diff']}" if hints.get("diff") else None):
    for i, (_, _, names) in enumerate(pairs.values()):
      if wanted is not None and wanted in names:
        return i
  return 0


def _runs_with_checkpoints(root: ResultsRoot) -> dict[str, Any]:
  return {r.name: r for r in root.runs if (r.path / "checkpoints").is_dir()}


def dict_size(run: Run) -> int | None:
  """The run's number of latents, from its training config (else its latent table); None when neither is there."""
  try:
    cfg = run_read(run, "config")
    size = cfg.get("crosscoder.dict_size", cfg.get("dict_size"))
    if size is None and run.has("latents.parquet"):
      size = len(run_read(run, "latents"))
  except (OSError, ValueError, KeyError):
    return None
  return None if size is None else int(size)


def hints(root: ResultsRoot) -> dict[str, Any]:
  """The run, diff result and latent the URL names (else those chosen on another page), each checked.

  A run or diff result the root does not hold, or a latent that is not an index of the run's dictionary, is
  refused with an error naming the valid ones and not used; the ones used are written to the URL.
  """
  out: dict[str, Any] = {"run": None, "diff": None, "latent": None, "alpha": None}
  alpha = query_param("alpha")
  if alpha is not None:
    try:
      out["alpha"] = float(alpha)
    except ValueError:
      st.error(f"alpha '{alpha}' is not a number: give the steering strength as one (e.g. alpha=2). α starts at 1.")
    if out["alpha"] is not None and not np.isfinite(out["alpha"]):
      st.error(f"alpha '{alpha}' is not a finite number. α starts at 1.")
      out["alpha"] = None
  for param, names, noun in (("run", [r.name for r in root.runs], "run"),
                             ("diff", [d.name for d in root.diffs], "diff result")):
    wanted = query_param(param)
    if wanted is None:
      before = remembered(param)
      if before in names:
        out[param] = before
        set_param(param, before)
    elif wanted in names:
      out[param] = wanted
      remember(param, wanted)
    else:
      st.error(not_found(noun, wanted, names) + " The model pair below is the first one, not that " + noun + "'s.")
  runs = _runs_with_checkpoints(root)
  # The run the latent fields start on: the hinted one when it has checkpoints, else the first that has.
  run = runs.get(out["run"] or "") or next(iter(runs.values()), None)
  wanted = query_param("latent")
  if wanted is None:
    before = remembered("latent")
    if isinstance(before, tuple) and run is not None and before[0] == run.name:
      out["latent"] = int(before[1])
      set_param("latent", str(before[1]))
    return out
  size = dict_size(run) if run is not None else None
  if run is None:
    st.error(f"latent '{wanted}': no run here has checkpoints to steer by or read latents of.")
  elif not wanted.strip().isdigit() or (size is not None and int(wanted) >= size):
    st.error(f"latent '{wanted}' is not a latent of run {run.name}: its latents are 0..."
             f"{'?' if size is None else size - 1} (whole numbers). The latent fields below start empty or at 0.")
  else:
    out["latent"] = int(wanted)
    remember("latent", (run.name, int(wanted)))
  return out


def _same(a: str, b: str) -> bool:
  try:
    return a == b or Path(a).resolve() == Path(b).resolve()
  except OSError:
    return a == b


def made_from_other_pair(item: Run | DiffResult, pair: tuple[str, str] | None, what: str) -> str | None:
  """A warning when `item` was made from another model pair than `pair` (base, fine-tuned), else None."""
  if pair is None:
    return None
  kind = "run" if isinstance(item, Run) else "diff result"
  try:
    made = item.models()
  except (OSError, ValueError):
    made = None
  if made is None:
    return (f"{kind} {item.name} does not record the model pair it was made from (analysis/summary.json `models`, "
            f"diff/pair.json): {what} may not belong to {Path(pair[0]).name} → {Path(pair[1]).name}.")
  if _same(made[0], pair[0]) and _same(made[1], pair[1]):
    return None
  return (f"{kind} {item.name} was made from {Path(made[0]).name} → {Path(made[1]).name}, not from the selected "
          f"pair {Path(pair[0]).name} → {Path(pair[1]).name}: {what} describes the other pair's activations, so "
          "what it does here is not what it was found to do.")


def steering_widgets(root: ResultsRoot, pair: tuple[str, str] | None = None,
                     hint: dict[str, Any] | None = None) -> tuple[live.Steering | None, dict[str, Any]]:
  """The steering source and strength the user picked (None for no steering), and what was chosen.

  `pair` (base, fine-tuned) is the selected model pair: a source made from another pair is named in a warning.
  """
  hint = hint or {}
  chosen: dict[str, Any] = {}
  # A link that names a latent and a strength (a latent page's "steer on Live") opens on steering by that latent.
  steer_by_latent = hint.get("latent") is not None and hint.get("alpha") is not None
  source = st.radio("Steering", SOURCES, index=SOURCES.index("crosscoder latent") if steer_by_latent else 0,
                    horizontal=True, key="live_steer_source")
  chosen["source"] = source
  if source == "none":
    return None, chosen
  c1, c2, c3, c4 = st.columns(4)
  if source in (SOURCES[1], SOURCES[2]):
    method, file = ("adl", "means.npz") if source == SOURCES[1] else ("pca", "components.npy")
    diffs = {d.name: d for d in root.diffs if d.has(method, file)}
    if not diffs:
      st.info("No diff result has ADL means (diff/adl/means.npz): run `python -m launch.diff` (or `python -m "
              "launch.demo`) to steer by δ_p." if method == "adl" else
              "No diff result has PCA components (diff/pca/components.npy): run `python -m launch.diff "
              "--config.methods='(\"pca\",)'` to steer by a principal component.")
      return None, chosen
    names = list(diffs)
    name = c1.selectbox("diff result", names, index=names.index(hint["diff"]) if hint.get("diff") in names else 0,
                        key="live_steer_diff")
    warning = made_from_other_pair(diffs[name], pair, "its δ_p" if method == "adl" else "its principal component")
    if warning:
      st.warning(warning)
    if method == "adl":
      means = adl_means(diffs[name])
      layer = c2.selectbox("layer", [int(l) for l in np.asarray(means["layers"]).reshape(-1)],
                           key="live_steer_layer")
      position = c3.selectbox("position p", live.adl_positions(means), key="live_steer_position")
      alpha = c4.number_input("α (× typical residual norm)", value=1.0, step=0.25, key="live_alpha")
      chosen.update(diff=name, layer=layer, position=position)
      return live.adl_steering(means, layer, position, alpha), chosen
    pca_dir = diffs[name].diff_dir / "pca"
    pca = pca_for(str(pca_dir), _stamp(pca_dir / "components.npy"))
    comp = c2.number_input(f"component (0..{len(pca['components']) - 1}; layer {pca['layer']})", min_value=0,
                           max_value=len(pca["components"]) - 1, value=0, key="live_steer_component")
    alpha = c4.number_input("α (× the component's σ)", value=4.0, step=0.5, key="live_alpha")
    chosen.update(diff=name, component=int(comp))
    return live.pca_steering(pca, int(comp), alpha), chosen
  runs = _runs_with_checkpoints(root)
  if not runs:
    st.info("No crosscoder run with checkpoints: train one with `python -m launch.train` (or `python -m "
            "launch.demo`) to steer by a latent.")
    return None, chosen
  names = list(runs)
  wanted = hint.get("run")
  name = c1.selectbox("run", names, index=names.index(wanted) if wanted in names else 0, key="live_steer_run")
  warning = made_from_other_pair(runs[name], pair, "its latents' decoder directions")
  if warning:
    st.warning(warning)
  run = run_for(str(runs[name].path), _stamp(runs[name].path / "checkpoints"))
  size = run.crosscoder.cfg.dict_size
  table = latent_table(runs[name])
  if hint.get("latent") is not None and name == (wanted or names[0]):
    default = int(hint["latent"])
  else:  # never a latent that never fired: steering by one barely moves the models
    best = default_latent(table) if table is not None else None
    default = 0 if best is None else best
  latent = c2.number_input(f"latent (0..{size - 1}; layer {run.layer})", min_value=0, max_value=size - 1,
                           value=min(default, size - 1), key="live_steer_latent")
  if table is None:
    c2.caption("run not analysed: which latents are dead is unknown")
  elif int(latent) in dead_latents(table):
    c2.badge(DEAD_BADGE, icon=":material/block:", color="red")
    st.warning(f"Latent {int(latent)} of run {name} {NEVER_FIRED} on the analysed tokens: it has no max activation, "
               "so α is in code units and its decoder row (near its initialisation) barely moves the models. "
               f"The best live latent of this run is {default_latent(table)}.")
  _, unit = live.latent_unit(run, int(latent))
  alpha = c4.number_input(f"α ({unit})", value=float(hint["alpha"]) if steer_by_latent else 1.0, step=0.5,
                          key="live_alpha")
  if query_param("alpha") is not None:  # the URL keeps naming the strength shown
    set_param("alpha", f"{float(alpha):g}")
  chosen.update(run=name, latent=int(latent))
  return live.latent_steering(run, int(latent), alpha), chosen


def latent_table(run: Run) -> pd.DataFrame | None:
  """The run's latent table, None when it has not been analysed (or cannot be read)."""
  if not run.has("latents.parquet"):
    return None
  try:
    return run_read(run, "latents")
  except (OSError, ValueError):
    return None


def latent_widgets(root: ResultsRoot, steer_choice: dict[str, Any], pair: tuple[str, str] | None = None,
                   hint: dict[str, Any] | None = None) -> tuple[str | None, list[int]]:
  """The run and latents whose activations on the prompt are shown (none when no run has checkpoints)."""
  hint = hint or {}
  runs = _runs_with_checkpoints(root)
  if not runs:
    return None, []
  names = list(runs)
  wanted = steer_choice.get("run") or hint.get("run")
  c1, c2 = st.columns([1, 2])
  name = c1.selectbox("activations of latents of run", names, index=names.index(wanted) if wanted in names else 0,
                      key="live_act_run")
  default = steer_choice.get("latent", hint.get("latent") if name == (hint.get("run") or names[0]) else None)
  table = latent_table(runs[name])
  text = c2.text_input("latents (comma-separated; empty: none)", value="" if default is None else str(default),
                       key="live_act_latents")
  try:
    latents = [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    st.error(f"latents {text!r} are not integers: give indices like `12, 40`.")
    latents = []
  size = dict_size(runs[name])
  bad = [j for j in latents if j < 0 or (size is not None and j >= size)]
  if bad:
    st.error(f"latent(s) {', '.join(map(str, bad))} are not latents of run {name}: its latents are 0..."
             f"{'?' if size is None else size - 1}.")
    latents = [j for j in latents if j not in bad]
  dead = sorted(set(latents) & dead_latents(table)) if table is not None else []
  if dead:
    st.warning(f"latent(s) {', '.join(map(str, dead))} of run {name}: {DEAD_BADGE} on the analysed tokens (their "
               "activations below are expected to be 0).")
  if latents:
    warning = made_from_other_pair(runs[name], pair, "its latents")
    if warning:
      st.warning(warning)
  return name, latents


def tokens_html(acts: live.LatentActivations, column: int, dead: set[int] | frozenset[int] = frozenset()) -> str:
  """The text's tokens, each on a background by latent `column`'s activation / its max, the strongest boxed; a latent
  in `dead` (never fired on the analysed tokens) carries the dead badge."""
  a = np.asarray(acts.acts[:, column], np.float64)
  top = float(a.max()) if len(a) else 0.0
  spans = []
  for i, (tok, v) in enumerate(zip(acts.tokens, a)):
    shown = html.escape(tok).replace("\n", "↵").replace("\t", "⇥")
    alpha = 0.0 if top <= 0 else max(0.0, float(v)) / top
    style = f"background: rgba(255, 120, 0, {alpha:.3f}); padding: 1px 0; white-space: pre;"
    cls = "live-token firing" if top > 0 and i == int(a.argmax()) else "live-token"
    extra = " border: 2px solid #c00; font-weight: bold;" if "firing" in cls else ""
    spans.append(f'<span class="{cls}" title="{float(v):.4f}" style="{style}{extra}">{shown}</span>')
  j = acts.latents[column]
  badge = f' <span class="dead-badge" style="color: #c00; font-weight: bold;">[{DEAD_BADGE}]</span>' if j in dead \
      else ""
  return (f'<div class="live-latent" data-latent="{j}"><b>latent {j}</b>{badge} (max {top:.4f}): '
          f'{"".join(spans)}</div>')


def _run(session: live.LiveSession, root: ResultsRoot, prompt: str, top_k: int, max_new: int, chat: bool,
         steer: live.Steering | None, act_run: str | None, latents: list[int], amplify: float = 1.0) -> dict[str, Any]:
  """Everything the page shows for one submitted prompt."""
  out: dict[str, Any] = {"prompt": prompt, "steer": steer.label if steer is not None else None,
                         "pair": (session.base_path, session.ft_path, session.dtype)}
  out["table"] = session.next_token_table(prompt, top_k, chat=chat)
  if steer is not None:
    out["table_steered"] = session.next_token_table(prompt, top_k, steer=steer, chat=chat)
  if amplify == 1.0:  # α = 1 is the fine-tune itself
    out["gen"] = session.generate(prompt, max_new, steer=steer, chat=chat)
  else:
    out["gen"] = session.generate_amplified(prompt, amplify, max_new, steer=steer, chat=chat)
    out["amplification_source"] = session.amplification_source
  if act_run is not None and latents:
    run = root.run(act_run)
    loaded = run_for(str(run.path), _stamp(run.path / "checkpoints"))
    out["acts"] = session.latent_activations(prompt, loaded, latents)
    table = latent_table(run)
    out["acts_dead"] = dead_latents(table) if table is not None else set()
  return out


def _probs_table(df: pd.DataFrame) -> pd.DataFrame:
  show = df[["token", "p_base", "p_ft", "p_diff", "rank_base", "rank_ft", "token_id"]].copy()
  show["token"] = [repr(t) for t in show.token]
  return show


def show_outputs(out: dict[str, Any]) -> None:
  """Next-token tables, generations side by side (steered under them), latent activations."""
  st.subheader("Next token")
  st.caption("Each model's probability of the next token after the prompt: the union of both top-k, by the larger.")
  st.dataframe(_probs_table(out["table"]), hide_index=True, key="live_next_tokens")
  if "table_steered" in out:
    st.caption(f"Steered ({out['steer']}):")
    st.dataframe(_probs_table(out["table_steered"]), hide_index=True, key="live_next_tokens_steered")
  st.subheader("Generations (greedy)")
  gen = out["gen"]
  st.caption("Each box: the prompt as the models read it (grey, the chat template applied), then the model's "
             "continuation, and where generation stopped.")
  _generations(gen, "", "")
  if gen.ft_steered is not None:
    st.caption(f"Steered: {out['steer']}")
    _generations(gen, ", steered", "_steered")
  if gen.ft_amplified is not None:
    st.markdown(f"**Fine-tuned model, weight difference amplified: α = {gen.amplified_alpha:g}**")
    st.caption(f"Every block's projections at W_base + α·ΔW ({out.get('amplification_source', '')}); α = 1 is the "
               "fine-tune, α > 1 exaggerates what fine-tuning changed. `launch.diff`'s amplification method sweeps α "
               "and grades coherence.")
    _generation_box(gen, "ft_amplified")
  if "acts" in out:
    acts = out["acts"]
    st.subheader("Latent activations on the prompt")
    st.caption("Plain text after BOS, as the crosscoder's training data was read; hover a token for its activation.")
    with st.container(key="live_latent_acts"):
      st.html("".join(tokens_html(acts, i, out.get("acts_dead", set())) for i in range(len(acts.latents))))
    with st.expander("as a table"):
      st.dataframe(acts.frame(), hide_index=True, key="live_latent_table")


def _generations(gen: live.Generations, label: str, key: str) -> None:
  """Both models' generations side by side, in bordered boxes keyed `live_gen_{base,ft}{key}`: the prompt as read
  (grey), the continuation (st.text), and where it stopped (EOS / end of turn, or the token limit)."""
  for column, title, name in zip(st.columns(2), ("Base model", "Fine-tuned model"), ("base", "ft")):
    with column:
      st.markdown(f"**{title}{label}**")
      _generation_box(gen, f"{name}{key}")


def _generation_box(gen: live.Generations, name: str) -> None:
  """Continuation `name` in a bordered box keyed `live_gen_{name}`: the prompt as read (grey), the text, the stop."""
  prompt = html.escape(gen.prompt_text or gen.prompt).replace("\n", "↵\n")
  with st.container(border=True, key=f"live_gen_{name}"):
    st.html(f'<div class="live-prompt" style="color: #888; white-space: pre-wrap; font-family: monospace; '
            f'font-size: 0.85em;">{prompt}</div>')
    st.text(getattr(gen, name))
    st.caption(gen.stop_text(name))


def render(root: ResultsRoot, model_mesh: tuple[int, ...] = ()) -> None:
  """The Live page; the pair is loaded onto a model mesh of `model_mesh` ((data, model) sizes) when given."""
  st.header("Live: prompt both models")
  pairs = model_pairs(root)
  if not pairs:
    st.info("No run or diff in these results records its model pair (analysis/summary.json `models`, "
            "diff/pair.json): rerun `python -m launch.analyze` or `python -m launch.diff`, or `python -m launch.demo`.")
    return
  hint = hints(root)
  labels = list(pairs)
  c1, c2 = st.columns([4, 1])
  label = c1.selectbox("model pair", labels, index=_default_pair(pairs, hint), key="live_pair")
  dtype = c2.selectbox("dtype", ["float32", "bfloat16"], key="live_dtype")
  base, ft, _ = pairs[label]
  try:
    session = session_for(base, ft, dtype, tuple(model_mesh))
  except Exception as e:  # noqa: BLE001  a missing or unreadable checkpoint: say which, keep the other pages
    st.error(f"Could not load the models {base} and {ft}: {e}")
    return
  st.caption(f"{session.num_layers} layers, d={session.hidden_size}; prompts are "
             f"{'a user turn of the chat template' if session.chat else 'plain text after BOS'} unless unticked.")
  try:
    steer, choice = steering_widgets(root, (base, ft), hint)
  except _ERRORS as e:
    st.error(str(e))
    steer, choice = None, {}
  act_run, latents = latent_widgets(root, choice, (base, ft), hint)
  with st.form("live_form"):
    prompt = st.text_area("Prompt", value=DEFAULT_PROMPT, key="live_prompt")
    c1, c2, c3 = st.columns(3)
    top_k = c1.number_input("next tokens per model (top k)", min_value=1, max_value=100, value=10, key="live_top_k")
    max_new = c2.number_input("new tokens", min_value=1, max_value=512, value=32, key="live_max_new_tokens")
    chat = c3.checkbox("chat template", value=session.chat, disabled=not session.chat, key="live_chat")
    amplify = st.slider("weight amplification α: also generate from W_base + α·(W_ft − W_base), every block's "
                        "projections (1 = off: the fine-tune itself)", min_value=-1.0, max_value=8.0, value=1.0,
                        step=0.25, key="live_amplify")
    submitted = st.form_submit_button("Run both models", type="primary", key="live_submit")
  inputs = {"steering": "none" if steer is None else f"{steer.label}, α = {float(steer.alpha):g}",
            "latents shown": f"{act_run}: {', '.join(map(str, latents)) or 'none'}", "prompt": prompt,
            "top k": int(top_k), "new tokens": int(max_new), "chat template": bool(chat),
            "weight amplification": float(amplify)}
  if submitted:
    try:
      with st.spinner("Running both models…"):
        t = time.perf_counter()
        result = _run(session, root, prompt, int(top_k), int(max_new), bool(chat), steer, act_run, latents,
                      float(amplify))
        result.update(inputs=inputs, seconds=time.perf_counter() - t)
        st.session_state["live_out"] = result
    except _ERRORS as e:
      st.session_state.pop("live_out", None)
      st.error(str(e))
  out = st.session_state.get("live_out")
  if out is not None and out["pair"] == (base, ft, dtype):  # a result of another pair is not shown under this one
    changed = stale_inputs(out.get("inputs", {}), inputs)
    if changed:
      st.warning(f"Stale: the outputs below were computed before {', '.join(changed)} changed. Press \"Run both "
                 "models\" to update them.")
    else:
      st.caption(f"Computed in {out.get('seconds', 0.0):.2f} s (a repeated request is served from the session's "
                 "cache, without running the models).")
    with st.container(key="live_outputs_stale" if changed else "live_outputs"):
      show_outputs(out)
  elif out is not None:
    st.info("The last outputs were for another model pair or dtype and are not shown: press \"Run both models\".")


def stale_inputs(shown: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The inputs (steering, latents, prompt, ...) whose current value differs from the one the outputs were made with."""
  return [k for k in current if shown.get(k) != current[k]]


__all__ = ["SOURCES", "dict_size", "hints", "latent_table", "latent_widgets", "made_from_other_pair", "model_pairs",
           "render", "run_for", "session_for", "show_outputs", "stale_inputs", "steering_widgets", "tokens_html"]
