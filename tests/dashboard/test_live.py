"""dashboard/live: next-token tables, generations, steering and latent activations against independent references."""

from __future__ import annotations

import html
import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

from neurodiff_jax.crosscoder import Crosscoder, CrosscoderConfig
from neurodiff_jax.crosscoder.checkpoint import Checkpointer
from neurodiff_jax.crosscoder.model import init_params
from neurodiff_jax.dashboard import live
from neurodiff_jax.models.generate import stop_ids
from neurodiff_jax.organisms.random_model import build_random_checkpoint
from tests.numerics import forward_c, residual_c
from tests.numerics import U64, assert_close, rounding

PROMPT = "The miller counts his sacks of grain"


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
  """Two random Gemma 2 checkpoints (seeds 0 and 1) sharing one tokenizer (with a chat template)."""
  root = tmp_path_factory.mktemp("live_pair")
  return (build_random_checkpoint(root / "base", family="gemma2", seed=0),
          build_random_checkpoint(root / "ft", family="gemma2", seed=1))


@pytest.fixture(scope="module")
def session(pair_dirs):
  """One LiveSession on the pair (loaded once for the module, as the app does per server session)."""
  return live.LiveSession(*pair_dirs)


def _softmax(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def _check_probs(got, z, idx, cfg, what):
  """Probabilities `got` against the float64 softmax of logits `z` [V] at `idx`: both softmaxes are float64, so a
  probability's relative error is the absolute error of the logits, the forward's rounding at the logits' magnitude."""
  want = _softmax(z)[idx]
  assert_close(got, want, c=forward_c(cfg), scale=want * np.abs(z).max(), what=what)
  return want


def _logits(model, ids, interventions=None) -> np.ndarray:
  """Last-position logits of an unpadded forward [V] (the reference the padded, jitted path must equal)."""
  out = model(jnp.asarray([ids], jnp.int32), interventions=interventions)
  return np.asarray(out.logits[0, -1], np.float64)


def _is_greedy(model, ids, out, n, stops, interventions=None) -> bool:
  """Whether `out` is the greedy continuation of `ids`: one teacher-forced unpadded forward of prompt + out."""
  seq = list(ids) + list(out)
  logits = np.asarray(model(jnp.asarray([seq], jnp.int32), interventions=interventions).logits[0], np.float64)
  best = logits[len(ids) - 1:].argmax(-1)  # [len(out) + 1]: the argmax after the prompt and each generated token
  if any(t in stops for t in out) or best[:len(out)].tolist() != list(out):
    return False
  return len(out) == n or int(best[len(out)]) in stops  # stopped early only at a stop token


def test_next_token_table_equals_softmax_of_a_direct_forward(session):
  """p_base / p_ft and ranks equal numpy softmax of each model's own forward; rows = union of both top-k."""
  k = 5
  table = session.next_token_table(PROMPT, top_k=k)
  ids = session.encode(PROMPT)
  chat = session.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True,
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
  assert ids == list(chat)  # a user turn with the generation prompt: the tokenizer has a chat template
  z = {"base": _logits(session.base, ids), "ft": _logits(session.ft, ids)}
  p = {name: _softmax(v) for name, v in z.items()}
  want = set(np.argsort(-p["base"])[:k].tolist()) | set(np.argsort(-p["ft"])[:k].tolist())
  assert set(table.token_id) == want
  tid = table.token_id.to_numpy()
  cfg = session.ft.cfg
  # The padded, jitted forward against an unpadded one.
  _check_probs(table.p_base, z["base"], tid, cfg, "next-token table p_base equals a softmax of a direct forward")
  _check_probs(table.p_ft, z["ft"], tid, cfg, "next-token table p_ft equals a softmax of a direct forward")
  # A difference that may cancel: the bound is the sum of both probabilities' errors.
  mag = p["ft"][tid] * np.abs(z["ft"]).max() + p["base"][tid] * np.abs(z["base"]).max()
  assert_close(table.p_diff, p["ft"][tid] - p["base"][tid], c=forward_c(cfg), scale=mag,
               what="next-token table p_diff equals p_ft − p_base of direct forwards")
  for name in ("base", "ft"):
    rank = {int(t): r + 1 for r, t in enumerate(np.argsort(-p[name], kind="stable"))}
    assert table[f"rank_{name}"].tolist() == [rank[int(t)] for t in tid]
  best = np.maximum(table.p_base, table.p_ft).to_numpy()
  assert (np.diff(best) <= 1e-12).all()  # sorted by the larger probability
  assert table.token.tolist() == [session.tokenizer.decode([int(t)]) for t in tid]
  assert not np.allclose(table.p_base, table.p_ft)  # two different models


def test_generate_equals_greedy_reference_and_steering(session):
  """Both generations equal step-by-step argmax decoding; α = 0 steering is unsteered; α > 0 steers as a direct hook."""
  n, layer = 8, 1
  ids = session.encode(PROMPT)
  stops = stop_ids(session.tokenizer)
  gen = session.generate(PROMPT, max_new_tokens=n)
  assert _is_greedy(session.base, ids, gen.ids["base"], n, stops)
  assert _is_greedy(session.ft, ids, gen.ids["ft"], n, stops)
  assert gen.ft == session.tokenizer.decode(gen.ids["ft"], skip_special_tokens=False)
  assert gen.base_steered is None and gen.ft_steered is None

  v = np.random.default_rng(0).normal(size=session.hidden_size)
  zero = session.generate(PROMPT, max_new_tokens=n, steer=live.Steering(layer, v, 0.0))
  assert zero.ids["base_steered"] == gen.ids["base"] and zero.ids["ft_steered"] == gen.ids["ft"]

  alpha = 40.0
  add = jnp.asarray(alpha * v, jnp.float32)
  hook = {layer: lambda x: x + add}
  strong = session.generate(PROMPT, max_new_tokens=n, steer=live.Steering(layer, v, alpha))
  assert _is_greedy(session.ft, ids, strong.ids["ft_steered"], n, stops, hook)
  assert _is_greedy(session.base, ids, strong.ids["base_steered"], n, stops, hook)
  assert not _is_greedy(session.ft, ids, strong.ids["ft_steered"], n, stops)  # unsteered, the model would differ
  assert strong.ids["ft_steered"] != gen.ids["ft"]  # the steer is strong enough to change the text

  p = session.next_token_probs(ids, live.Steering(layer, v, alpha))
  _check_probs(p["ft"], _logits(session.ft, ids, hook), slice(None), session.ft.cfg,
               "steered next-token distribution equals a softmax of a forward with the hook")


def test_adl_steering_is_typical_norm_times_unit_delta():
  """v = N_L · δ_p / ‖δ_p‖ for the asked layer and position label (labels may be negative)."""
  rng = np.random.default_rng(1)
  delta = rng.normal(size=(2, 4, 16))
  means = {"layers": np.array([1, 3]), "positions": np.array([-2, -1, 0, 1]), "delta": delta,
           "typical_norm_ft": np.array([5.0, 9.0])}
  s = live.adl_steering(means, 3, -1, 2.5)
  assert s.layer == 3 and s.alpha == 2.5
  # N · δ / ‖δ‖ in float64: a norm over d, then a product and a ratio per element (no cancellation: each element
  # is its own scale).
  c = rounding(n=16, depth=2, u=U64)
  want = 9.0 * delta[1, 1] / np.linalg.norm(delta[1, 1])
  assert_close(s.vector, want, c=c, scale=np.abs(want), what="ADL steering vector = N_L · δ_p / ‖δ_p‖")
  # The addition is α·v rounded to float32, and its norm a float32 sum of 16 squares.
  assert_close(np.linalg.norm(s.addition), 2.5 * 9.0, c=rounding(n=16, depth=2),
               what="ADL steering addition has norm α · N_L")
  old = {k: v for k, v in means.items() if k != "positions"}  # means written before labels: 0..n-1
  want = 5.0 * delta[0, 2] / np.linalg.norm(delta[0, 2])
  assert_close(live.adl_steering(old, 1, 2, 1.0).vector, want, c=c, scale=np.abs(want),
               what="ADL steering of means without position labels reads label p as row p")
  with pytest.raises(live.LiveError, match=r"layers \[1, 3\]"):
    live.adl_steering(means, 2, 0, 1.0)
  with pytest.raises(live.LiveError, match="positions"):
    live.adl_steering(means, 1, 5, 1.0)


def test_pca_steering_reads_the_saved_components(tmp_path):
  """v = σ_i · v_i from components.npy and pca_variance.parquet at done.json's layer."""
  rng = np.random.default_rng(2)
  comps = np.linalg.qr(rng.normal(size=(16, 3)))[0].T.astype(np.float32)  # [k, d] unit rows
  std = np.array([3.0, 2.0, 0.5])
  np.save(tmp_path / "components.npy", comps)
  pd.DataFrame({"component": range(3), "variance": std**2, "std": std}).to_parquet(tmp_path / "pca_variance.parquet")
  (tmp_path / "done.json").write_text(json.dumps({"key": "x", "summary": {"layer": 2}}))
  pca = live.read_pca(tmp_path)
  s = live.pca_steering(pca, 1, -3.0)
  assert s.layer == 2
  # σ · v_i and α σ v_i: products of float32 components, one rounding each (float32 for the addition).
  want = 2.0 * comps[1].astype(np.float64)
  assert_close(s.vector, want, c=rounding(), scale=np.abs(want), what="PCA steering vector = σ_i · v_i")
  want = -6.0 * comps[1].astype(np.float64)
  assert_close(s.addition, want, c=rounding(), scale=np.abs(want), what="PCA steering addition = α σ_i v_i")
  with pytest.raises(live.LiveError, match="components 0..2"):
    live.pca_steering(pca, 3, 1.0)
  with pytest.raises(live.LiveError, match="launch.diff"):
    live.read_pca(tmp_path / "missing")


def _crosscoder(d: int, m: int, sparsity: str, seed: int) -> Crosscoder:
  cfg = CrosscoderConfig(num_models=2, d_model=d, dict_size=m, sparsity=sparsity, k=4)
  params = init_params(jax.random.key(seed), cfg)
  params["w_enc"] = params["w_enc"] * 40.0  # codes of order one on the models' residuals
  params["b_enc"] = jnp.full((m,), -0.1, jnp.float32)
  return Crosscoder(cfg=cfg, params=params, theta=0.05 if sparsity == "batchtopk" else 0.0,
                    norm_scale=np.array([0.7, 1.3], np.float32))


@pytest.mark.parametrize("sparsity", ["batchtopk", "l1"])
def test_latent_activations_equal_encode_of_separately_captured_residuals(session, tmp_path, sparsity):
  """Codes of chosen latents on typed text equal Crosscoder.encode of both models' residuals stacked [T, 2, d]."""
  layer, m = 1, 64
  cc = _crosscoder(session.hidden_size, m, sparsity, seed=3)
  run = live.LoadedRun(tmp_path, cc, layer, None)
  text = "A ship sails out of the harbour at night."
  ids = session.tokenizer(text, add_special_tokens=False)["input_ids"]
  ids = [session.tokenizer.bos_token_id] + list(ids)
  x = np.stack([np.asarray(mdl(jnp.asarray([ids]), capture=(layer,)).residuals[layer][0]) for mdl in
                (session.base, session.ft)], axis=1)  # [T, 2, d]
  want = np.asarray(cc.encode(x))  # [T, m]
  fired = np.flatnonzero((want > 0).any(axis=0))
  assert len(fired) >= 2, "the test crosscoder must fire on this text"
  chosen = [int(fired[0]), int(fired[-1]), int(np.flatnonzero(~(want > 0).any(axis=0))[0])]
  acts = session.latent_activations(text, run, chosen)
  assert acts.token_ids == ids and acts.latents == chosen
  assert acts.tokens == [session.tokenizer.decode([i]) for i in ids]
  # The session's padded, jitted forward against unpadded ones (residuals after block 1), then the encoder's sum over
  # M·d terms; the codes share one magnitude (the scale: the largest code of any latent, as a code near 0 carries the
  # rounding of its pre-activation's terms).
  cfg = session.ft.cfg
  assert_close(acts.acts, want[:, chosen], c=residual_c(cfg, layer, after=1, n=2 * cfg.hidden_size),
               scale=np.abs(want).max(), what=f"{sparsity}: live latent activations equal Crosscoder.encode")
  frame = acts.frame()
  assert list(frame.columns) == ["position", "token", "token_id"] + [f"latent_{j}" for j in chosen]
  with pytest.raises(live.LiveError, match="latents 0..63"):
    session.latent_activations(text, run, [m])


def _save_run(workdir, cc: Crosscoder, layer: int) -> None:
  """A training run's checkpoint as launch.train writes it (Orbax model/train/data/config items)."""
  ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
  state = {"model": {"params": cc.params, "theta": jnp.float32(cc.theta), "norm_scale": jnp.asarray(cc.norm_scale)},
           "train": {"step": jnp.int32(10)}}
  ckpt.save(10, state, {"next_index": 0}, {"run": {"layer": layer, "name": "t"}, "crosscoder": cc.cfg.to_dict()})
  ckpt.close()


def test_load_run_and_latent_steering(session, tmp_path):
  """load_run reads the checkpoint, layer (config, then analysis) and max_act; latent steering = max_act · d_chat."""
  cc = _crosscoder(session.hidden_size, 32, "batchtopk", seed=4)
  _save_run(tmp_path, cc, layer=2)
  run = live.load_run(tmp_path)
  assert run.layer == 2 and run.max_act is None
  # A float32 checkpoint round trip: at most one float32 rounding of each value.
  assert_close(run.crosscoder.decoder(), cc.decoder(), c=rounding(), what="loaded run's decoder equals the saved one")
  assert_close(run.crosscoder.theta, cc.theta, c=rounding(), what="loaded run's θ equals the saved one")
  s = live.latent_steering(run, 5, 3.0)
  want = cc.decoder()[5, 1].astype(np.float64)
  assert_close(s.vector, want, c=rounding(), scale=np.abs(want),
               what="latent steering vector without max_act is the chat decoder row")  # code units

  (tmp_path / "analysis").mkdir()
  (tmp_path / "analysis" / "summary.json").write_text(json.dumps({"layer": 1}))
  max_act = np.linspace(0.5, 2.0, 32)
  pd.DataFrame({"latent": np.arange(32)[::-1], "max_act": max_act[::-1]}).to_parquet(
      tmp_path / "analysis" / "latents.parquet")
  run = live.load_run(tmp_path)
  assert run.layer == 1
  assert_close(run.max_act, max_act, c=rounding(u=U64), what="max_act read from latents.parquet, by latent")
  s = live.latent_steering(run, 5, 3.0)
  # α · max_act_j · d_j in float64, rounded to float32: a product, one float32 rounding per element.
  want = 3.0 * max_act[5] * cc.decoder()[5, 1].astype(np.float64)
  assert_close(s.addition, want, c=rounding(), scale=np.abs(want),
               what="latent steering addition = α · max_act_j · d_j^chat")
  with pytest.raises(live.LiveError, match="latents 0..31"):
    live.latent_steering(run, 32, 1.0)


def test_errors_name_the_fix(session):
  """A vector of another width, a layer past the model, an empty prompt: one LiveError each."""
  with pytest.raises(live.LiveError, match="this model pair"):
    session.generate(PROMPT, 2, steer=live.Steering(0, np.ones(session.hidden_size + 1), 1.0))
  with pytest.raises(live.LiveError, match="out of range"):
    session.next_token_table(PROMPT, 3, steer=live.Steering(session.num_layers, np.ones(session.hidden_size), 1.0))
  with pytest.raises(live.LiveError, match="empty"):
    session.next_token_table("  ", 3)
  with pytest.raises(live.LiveError, match="top_k"):
    session.next_token_table(PROMPT, 0)


def _amplified_reference(session, alpha: float):
  """The fine-tune with every block's seven projections set to (1 − α) W_base + α W_ft in numpy (float64, then cast)."""
  from neurodiff_jax.models import load_model

  ref = load_model(session.ft_path)
  base = dict(nnx.to_flat_state(nnx.state(session.base)))
  changed = 0
  for path, var in nnx.to_flat_state(nnx.state(ref)):
    if path[0] == "layers" and str(path[-1]) in {"w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down"}:
      b, f = np.asarray(base[path][...], np.float64), np.asarray(var[...], np.float64)
      var.set_value(jnp.asarray((1 - alpha) * b + alpha * f, var[...].dtype))
      changed += 1
  assert changed == 7 * session.num_layers
  return ref


def test_generate_amplified_equals_greedy_decoding_of_the_amplified_weights(session):
  """α = 1 is the fine-tune's own continuation; α = 2 is the greedy continuation of a model whose projections were
  amplified in numpy, and differs from the fine-tune's; the session keeps one amplified copy (the last α's)."""
  n = 8
  ids = session.encode(PROMPT)
  stops = stop_ids(session.tokenizer)
  plain = session.generate(PROMPT, max_new_tokens=n)
  one = session.generate_amplified(PROMPT, 1.0, max_new_tokens=n)
  assert one.ids["ft_amplified"] == plain.ids["ft"] and one.amplified_alpha == 1.0
  two = session.generate_amplified(PROMPT, 2.0, max_new_tokens=n)
  assert two.ids["ft"] == plain.ids["ft"] and two.ids["base"] == plain.ids["base"]
  assert two.ft_amplified == session.tokenizer.decode(two.ids["ft_amplified"], skip_special_tokens=False)
  assert _is_greedy(_amplified_reference(session, 2.0), ids, two.ids["ft_amplified"], n, stops)
  assert two.ids["ft_amplified"] != plain.ids["ft"]  # the amplification changed the text
  assert session._amplified[0] == 2.0
  steer = live.Steering(1, np.random.default_rng(0).normal(size=session.hidden_size), 40.0)
  steered = session.generate_amplified(PROMPT, 2.0, max_new_tokens=n, steer=steer)
  want = session.generate(PROMPT, max_new_tokens=n, steer=steer)
  assert steered.ids["ft_steered"] == want.ids["ft_steered"] and steered.ft_steered == want.ft_steered
  assert steered.ids["ft_amplified"] == two.ids["ft_amplified"]  # the amplified continuation is unsteered
  assert session.amplification_source.startswith("weights: W_ft − W_base")
  with pytest.raises(live.LiveError, match="must be a finite number"):
    session.generate_amplified(PROMPT, float("nan"))


@pytest.mark.slow
def test_live_page_in_apptest(demo_root, monkeypatch):
  """The Live page (AppTest): a prompt steered by a latent shows both models' generations, steered and not, as
  LiveSession computes them, the next-token table, and the latent's activations with its strongest token boxed."""
  from pathlib import Path

  from streamlit.testing.v1 import AppTest

  from neurodiff_jax.dashboard.views.live import model_pairs
  from neurodiff_jax.dashboard.results import discover

  app = str(Path(__file__).resolve().parents[2] / "neurodiff_jax" / "dashboard" / "app.py")
  monkeypatch.setenv("NEURODIFF_RESULTS", str(demo_root))
  at = AppTest.from_file(app, default_timeout=300)
  at.query_params["page"] = "live"
  at.run()
  assert not at.exception, [e.value for e in at.exception]
  at.radio(key="live_steer_source").set_value("crosscoder latent").run()
  assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
  run_name = at.selectbox(key="live_steer_run").value
  at.number_input(key="live_steer_latent").set_value(3)
  at.number_input(key="live_alpha").set_value(20.0)
  at.text_area(key="live_prompt").input(PROMPT)
  at.number_input(key="live_max_new_tokens").set_value(12)
  at.text_input(key="live_act_latents").input("3, 7")
  at.button(key="live_submit").click().run()
  assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])

  root = discover(demo_root)
  base, ft, _ = next(iter(model_pairs(root).values()))
  ref = live.LiveSession(base, ft)
  steer = live.latent_steering(live.load_run(root.run(run_name).path), 3, 20.0)
  want = ref.generate(PROMPT, 12, steer=steer)
  # st.text shows the text with its leading space dropped (a generation may start with " good").
  assert [t.value.strip() for t in at.text] == [w.strip() for w in (want.base, want.ft, want.base_steered,
                                                                      want.ft_steered)]
  assert want.ft_steered != want.ft or want.base_steered != want.base  # the steer changed something
  (table, steered) = [d.value for d in at.dataframe][:2]
  ntt = ref.next_token_table(PROMPT, 10)
  # The page's own LiveSession against this one: the same padded forward and float64 softmax, so at most the
  # forward's rounding; a probability's relative error is its logits' absolute error, at their magnitude.
  z = _logits(ref.ft, ref.encode(PROMPT))
  assert_close(table["p_ft"], ntt["p_ft"], c=forward_c(ref.ft.cfg), scale=ntt["p_ft"].to_numpy() * np.abs(z).max(),
               what="Live page's next-token table shows LiveSession's p_ft")
  assert table["token"].tolist() == [repr(t) for t in ntt.token]
  assert not np.allclose(steered["p_ft"].to_numpy()[:3], table["p_ft"].to_numpy()[:3])
  shown = at.get("html")[-1].value
  acts = ref.latent_activations(PROMPT, live.load_run(root.run(run_name).path), [3, 7])
  for i, part in enumerate(shown.split('class="live-latent"')[1:]):
    assert f'data-latent="{acts.latents[i]}"' in part
    a = acts.acts[:, i]
    assert part.count('class="live-token firing"') == int(a.max() > 0)
    titles = [float(t.split('"')[0]) for t in part.split('title="')[1:]]
    # Not a rounding comparison: the titles print each code with 4 decimals (f"{v:.4f}"), within 5e-5 of it.
    np.testing.assert_allclose(titles, a, atol=1e-4)


def _live_page(demo_root, monkeypatch, **params):
  """The Live page in AppTest, opened with query parameters `params`."""
  from pathlib import Path

  from streamlit.testing.v1 import AppTest

  monkeypatch.setenv("NEURODIFF_RESULTS", str(demo_root))
  at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "neurodiff_jax" / "dashboard" / "app.py"),
                         default_timeout=300)
  at.query_params["page"] = "live"
  for k, v in params.items():
    at.query_params[k] = str(v)
  at.run()
  assert not at.exception, [e.value for e in at.exception]
  return at


def test_live_page_refuses_unknown_names_and_warns_of_another_pair(demo_root, monkeypatch):
  """A run or latent the root lacks is refused naming the valid ones; a crosscoder latent (or a diff's δ_p) steering
  a pair its run (diff) was not made from is named in a warning, and not when the pair is its own."""
  from pathlib import Path

  from neurodiff_jax.dashboard.results import discover

  root = discover(demo_root)
  at = _live_page(demo_root, monkeypatch, run="nosuchrun", latent="abc")
  errors = [e.value for e in at.error]
  assert errors[0].startswith(f"run 'nosuchrun' not found; runs in this root: {', '.join(r.name for r in root.runs)}.")
  assert errors[1].startswith(f"latent 'abc' is not a latent of run {root.runs[0].name}: its latents are 0...")
  run = root.runs[0]
  other = next((d for d in root.diffs if d.models() != run.models()), None)
  if other is None:
    pytest.skip(f"every diff in {demo_root} was made from the runs' pair: nothing to warn of")
  at = _live_page(demo_root, monkeypatch, diff=other.name)  # the diff's pair (base → narrow in the demo)
  assert Path(other.models()[1]).name in at.selectbox(key="live_pair").value
  assert not at.warning
  at.radio(key="live_steer_source").set_value("crosscoder latent").run()
  name = at.selectbox(key="live_steer_run").value
  made = discover(demo_root).run(name).models()
  (warning,) = [w.value for w in at.warning]
  assert warning.startswith(f"run {name} was made from {Path(made[0]).name} → {Path(made[1]).name}, not from the "
                            f"selected pair {Path(other.models()[0]).name} → {Path(other.models()[1]).name}")
  # The run's own pair: no warning; the diff's δ_p on that pair: a warning naming the diff.
  own = next(label for label in at.selectbox(key="live_pair").options if f"run:{name}" in label)
  at.selectbox(key="live_pair").select(own).run()
  assert not at.warning and not at.error, ([w.value for w in at.warning], [e.value for e in at.error])
  at.radio(key="live_steer_source").set_value("δ_p (ADL)").run()
  at.selectbox(key="live_steer_diff").select(other.name).run()
  (warning,) = [w.value for w in at.warning]
  assert warning.startswith(f"diff result {other.name} was made from ") and "its δ_p" in warning


def test_live_page_starts_on_a_live_latent_and_says_what_alpha_is(demo_root, monkeypatch):
  """The steering latent starts on the best-ranked live chat-only latent of the run (else its most chat-leaning live
  one), never on one that never fired; the α label names the unit `latent_steering` uses: that latent's max activation,
  or code units (with the dead badge and a warning) for a latent that never fired."""
  from neurodiff_jax.dashboard.results import discover

  root = discover(demo_root)
  at = _live_page(demo_root, monkeypatch)
  at.radio(key="live_steer_source").set_value("crosscoder latent").run()
  assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
  name = at.selectbox(key="live_steer_run").value
  lat = pd.read_parquet(root.run(name).path / "analysis" / "latents.parquet")
  live_rows = lat[lat["tag"] != "dead"]
  chat = live_rows[(live_rows["tag"] == "chat_only") & live_rows["nu_rank"].notna()]
  want = int(chat.sort_values(["nu_rank", "latent"])["latent"].iloc[0]) if len(chat) else \
      int(live_rows.sort_values(["delta_norm", "latent"], ascending=[False, True])["latent"].iloc[0])
  assert at.number_input(key="live_steer_latent").value == want
  max_act = float(lat.set_index("latent").loc[want, "max_act"])
  assert max_act > 0
  assert at.number_input(key="live_alpha").label == f"α (× latent {want}'s max activation, {max_act:.4g})"
  assert not at.warning
  dead = lat.loc[lat["tag"] == "dead", "latent"]
  if not len(dead):
    return
  j = int(dead.min())
  at.number_input(key="live_steer_latent").set_value(j).run()
  assert at.number_input(key="live_alpha").label == (f"α (× 1 code unit: latent {j} has no max activation (it never "
                                                      "fired on the analysed tokens))")
  (warning,) = [w.value for w in at.warning]
  assert warning.startswith(f"Latent {j} of run {name} never fired on the analysed tokens") and str(want) in warning
  assert any("dead: never fired" in m.value for m in at.markdown)
  steer = live.latent_steering(live.load_run(root.run(name).path), j, 1.0)
  assert "code unit" in steer.label


def test_a_latent_pages_link_opens_live_steering_by_that_latent(demo_root, monkeypatch):
  """`?run=R&latent=J&alpha=A` (the link a latent page gives) opens Live steering by latent J of run R at α = A; a
  strength that is not a number is refused."""
  from neurodiff_jax.dashboard.results import discover

  root = discover(demo_root)
  run = root.runs[-1]
  at = _live_page(demo_root, monkeypatch, run=run.name, latent=5, alpha=3)
  assert not at.error, [e.value for e in at.error]
  assert at.radio(key="live_steer_source").value == "crosscoder latent"
  assert at.selectbox(key="live_steer_run").value == run.name
  assert at.number_input(key="live_steer_latent").value == 5 and at.number_input(key="live_alpha").value == 3.0
  at.number_input(key="live_alpha").set_value(4.5).run()
  assert at.query_params["alpha"] == "4.5"  # the URL follows the strength shown
  at = _live_page(demo_root, monkeypatch, run=run.name, latent=5, alpha="lots")
  assert [e.value for e in at.error] == ["alpha 'lots' is not a number: give the steering strength as one (e.g. "
                                         "alpha=2). α starts at 1."]
  assert at.radio(key="live_steer_source").value == "none"


def _count_model_work(session: live.LiveSession) -> dict[str, int]:
  """Wraps the session's generators and forwards to count the calls that run a model; returns the live counts."""
  calls = {"generate": 0, "forward": 0}
  for name in ("base", "ft"):
    gen, fwd = session._gen[name], session._fwd[name]

    def counted_gen(*a, _g=gen, **k):
      calls["generate"] += 1
      return _g(*a, **k)

    def counted_fwd(*a, _f=fwd, **k):
      calls["forward"] += 1
      return _f(*a, **k)

    session._gen[name], session._fwd[name] = counted_gen, counted_fwd
  return calls


def test_a_repeated_request_runs_no_model(pair_dirs):
  """The same pair, prompt, steering and length again is served from the session's cache: no generator or forward
  call; a different length, steering strength, prompt or template runs the models again."""
  session = live.LiveSession(*pair_dirs)
  calls = _count_model_work(session)
  first = session.generate(PROMPT, 6)
  assert calls == {"generate": 2, "forward": 0}  # one call per model
  again = session.generate(PROMPT, 6)
  assert calls["generate"] == 2 and again is first
  session.generate(PROMPT, 7)
  assert calls["generate"] == 4
  steer = live.Steering(0, np.ones(session.hidden_size), 1.0, "ones")
  session.generate(PROMPT, 6, steer=steer)
  session.generate(PROMPT, 6, steer=live.Steering(0, np.ones(session.hidden_size), 1.0, "another label"))
  assert calls["generate"] == 6  # the label is not what the models see: the same steering
  session.generate(PROMPT, 6, steer=live.Steering(0, np.ones(session.hidden_size), 2.0))
  session.generate(PROMPT, 6, chat=False)
  session.generate(PROMPT + " twice", 6)
  assert calls["generate"] == 12
  table = session.next_token_table(PROMPT, 5)
  assert calls["forward"] == 2
  pd.testing.assert_frame_equal(session.next_token_table(PROMPT, 5), table)
  session.next_token_table(PROMPT, 3)  # another k of the same distributions: no forward
  assert calls["forward"] == 2
  session.residuals(session.encode(PROMPT), 1)
  session.residuals(session.encode(PROMPT), 1)
  assert calls["forward"] == 4


def test_generations_say_where_they_stopped(pair_dirs):
  """A continuation ends at the first stop token (EOS, end of turn), named with the number of tokens before it, or at
  the token limit; the prompt is kept as the models read it."""
  session = live.LiveSession(*pair_dirs)
  stops = stop_ids(session.tokenizer)
  stop = min(stops)
  a, b = [i for i in range(10, 100) if i not in stops][:2]
  session._gen["base"] = lambda rows, n, **k: [[a, b, stop, a][:n] for _ in rows]  # a model that stops after 2
  session._gen["ft"] = lambda rows, n, **k: [[b] * n for _ in rows]  # and one that never does
  gen = session.generate(PROMPT, 4)
  assert gen.ids == {"base": [a, b], "ft": [b, b, b, b]}
  assert gen.stop_text("base") == (f"stopped at {session.tokenizer.decode([stop])!r} (end of sequence / turn) after 2 "
                                   "new tokens")
  assert gen.stop_text("ft") == "stopped at the 4-token limit (no end-of-sequence token)"
  assert gen.prompt_text == session.tokenizer.decode(session.encode(PROMPT), skip_special_tokens=False)
  assert PROMPT in gen.prompt_text


def test_live_page_marks_stale_outputs_and_serves_a_repeat_from_the_cache(demo_root, monkeypatch):
  """Outputs computed before the steering changed are marked stale, naming what changed; running again clears the
  mark; the same click again runs no model; each box shows the prompt, the continuation and where it stopped."""
  from neurodiff_jax.dashboard.views.live import model_pairs, session_for
  from neurodiff_jax.dashboard.results import discover

  at = _live_page(demo_root, monkeypatch)
  at.text_area(key="live_prompt").input(PROMPT)
  at.number_input(key="live_max_new_tokens").set_value(6)
  at.button(key="live_submit").click().run()
  assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
  assert not at.warning
  base, ft, _ = next(iter(model_pairs(discover(demo_root)).values()))
  session = session_for(base, ft, "float32")  # the page's own session (st.cache_resource)
  want = session.generate(PROMPT, 6)
  prompts = [h.value for h in at.get("html") if 'class="live-prompt"' in h.value]
  assert len(prompts) == 2 and all(html.escape(PROMPT) in p for p in prompts)
  captions = [c.value for c in at.caption]
  assert want.stop_text("base") in captions and want.stop_text("ft") in captions
  # The steering changes: the outputs are marked stale, naming it.
  at.radio(key="live_steer_source").set_value("crosscoder latent").run()
  (warning,) = [w.value for w in at.warning]
  assert warning.startswith("Stale: the outputs below were computed before steering") and "Run both models" in warning
  # Run again: fresh; the same click once more runs no model.
  at.button(key="live_submit").click().run()
  assert not at.warning
  calls = _count_model_work(session)
  at.button(key="live_submit").click().run()
  assert calls == {"generate": 0, "forward": 0} and not at.warning and not at.error


def test_live_page_weight_amplification_slider(demo_root, monkeypatch):
  """The α slider (in the prompt's form) adds the amplified fine-tune's continuation, as the page's LiveSession
  generates it; α = 1 shows none."""
  from neurodiff_jax.dashboard.views.live import model_pairs, session_for
  from neurodiff_jax.dashboard.results import discover

  at = _live_page(demo_root, monkeypatch)
  at.text_area(key="live_prompt").input(PROMPT)
  at.number_input(key="live_max_new_tokens").set_value(6)
  at.button(key="live_submit").click().run()
  assert not at.exception and not at.error
  assert len([h for h in at.get("html") if 'class="live-prompt"' in h.value]) == 2  # no amplified box at α = 1
  at.slider(key="live_amplify").set_value(3.0)
  at.button(key="live_submit").click().run()
  assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
  base, ft, _ = next(iter(model_pairs(discover(demo_root)).values()))
  want = session_for(base, ft, "float32").generate_amplified(PROMPT, 3.0, 6)
  assert [t.value.strip() for t in at.text] == [w.strip() for w in (want.base, want.ft, want.ft_amplified)]
  assert any("α = 3" in m.value for m in at.markdown)
  assert want.stop_text("ft_amplified") in [c.value for c in at.caption]
