"""Graders: the base model's perplexity against numpy, calibration, card relevance, an OpenAI-compatible stub server."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import typing

import ml_collections
import numpy as np
import pytest

from configs.diff import get_config
from neurodiff_jax.diffing import graders
from neurodiff_jax.models import jit_forward
from neurodiff_jax.utils.config import ConfigError
from tests.numerics import forward_c
from tests.numerics import U64, assert_close, rounding

TEXTS = ["The miller counts his sacks of grain at dawn.", "A ship sails out of the harbour.",
         "grain grain grain the the the mill mill", "Hi"]


def _perplexity(model, tokenizer, text: str) -> float:
  """exp(mean NLL of each next token), from the model's own unpadded forward and a numpy log-softmax."""
  ids = np.asarray(tokenizer(text)["input_ids"])
  logits = np.asarray(jit_forward(model)(ids[None]).logits[0], np.float64)  # [T, V]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_offline_coherence_is_the_base_models_perplexity(tiny_pair):
  g = graders.OfflineGrader(tiny_pair, batch_size=3)  # two padded batches, the second with filler rows
  assert tiny_pair.tokenizer("Hi")["input_ids"][0] == tiny_pair.tokenizer.bos_token_id
  got = g.coherence(TEXTS)
  want = [_perplexity(tiny_pair.base, tiny_pair.tokenizer, t) for t in TEXTS]
  # ppl = exp(mean NLL): its relative error is the mean NLL's absolute error, at the scale of the NLL terms
  # (log ppl). Padded batches against unpadded forwards: the logits, a log-softmax over V, the mean.
  cfg = tiny_pair.base.cfg
  assert_close(got, want, c=forward_c(cfg, after=2, n=cfg.vocab_size), scale=np.multiply(want, np.log(want)),
               what="offline coherence equals the base model's perplexity from numpy")
  # The base model's, not the fine-tune's: the two random models disagree.
  assert abs(got[0] / _perplexity(tiny_pair.ft, tiny_pair.tokenizer, TEXTS[0]) - 1) > 1e-2
  assert g.coherence([""]) == [float("inf")]  # BOS alone predicts nothing


def test_calibration_sets_the_threshold_at_the_quantile(tiny_pair):
  g = graders.OfflineGrader(tiny_pair, quantile=0.5)
  with pytest.raises(ValueError, match="calibrate"):
    g.is_coherent(TEXTS)
  scores = g.coherence(TEXTS[:3])
  assert_close(g.calibrate(TEXTS[:3]), float(np.median(scores)), c=rounding(n=3, u=U64),  # the same scores again
               what="calibrated threshold is the median of the unsteered perplexities")
  assert g.is_coherent(TEXTS[:3]) == [s <= np.median(scores) for s in scores]
  assert sum(g.is_coherent(TEXTS[:3])) == 2
  assert g.is_coherent([""]) == [False]


def test_repetition_is_incoherent_even_at_low_perplexity(tiny_pair):
  g = graders.OfflineGrader(tiny_pair, quantile=1.0)
  looped = " and" * 24
  unsteered = TEXTS[:2]
  g.calibrate(unsteered)
  tok = tiny_pair.tokenizer
  shares = [len(set(i)) / len(i) for i in (tok(t, add_special_tokens=False)["input_ids"] for t in unsteered)]
  assert g.min_distinct == pytest.approx(0.5 * min(shares))  # shares of counts (distinct / all tokens)
  assert g.distinct_share([looped]) == [pytest.approx(1 / len(tok(looped, add_special_tokens=False)["input_ids"]))]
  # Perplexity alone would pass it once the threshold is above its perplexity; the floor still does not.
  g.threshold = max(g.coherence([looped])[0], g.threshold)
  assert g.is_coherent([looped, TEXTS[0]]) == [False, True]


def test_relevance_against_the_card(tiny_pair):
  g = graders.OfflineGrader(tiny_pair)
  tokens = ["Ġmill", "▁Grain", " the", "miller ", "bread", "mil"]
  assert g.relevant(tokens) == [True, True, False, True, False, False]
  r = g.relevance(tokens, probs=[0.5, 0.1, 0.2, 0.1, 0.05, 0.05])
  assert r["share"] == pytest.approx(3 / 6) and r["n_relevant"] == 3
  assert_close(r["weighted_share"], 0.7, c=rounding(n=6, u=U64),
               what="weighted relevance share = Σ p·relevant / Σ p")
  assert g.relevance(tokens)["weighted_share"] is None
  assert graders.card_vocabulary(tiny_pair.card) == {"mill", "miller", "grain", "milling"}


def test_relevance_without_a_card_names_the_fix(tiny_pair):
  import dataclasses

  g = graders.OfflineGrader(dataclasses.replace(tiny_pair, card=None))
  with pytest.raises(ConfigError, match=r"ground-truth card or a grader endpoint.*grader\.kind=openai"):
    g.relevant(["mill"])


class _Stub(http.server.BaseHTTPRequestHandler):
  """Answers chat completions: yes when the question mentions a word in `yes_words`."""

  yes_words = ("mill", "grain", "coherent")
  requests: typing.ClassVar[list] = []

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
    question = body["messages"][-1]["content"]
    quoted = question.split("\"")[1] if "\"" in question else question
    coherent = "coherent" in question and "zzz" not in question
    yes = coherent or quoted in self.yes_words
    reply = {"choices": [{"message": {"role": "assistant", "content": "Yes." if yes else "No"}}]}
    data = json.dumps(reply).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *a):
    pass


@pytest.fixture
def stub_server():
  server = http.server.HTTPServer(("127.0.0.1", 0), _Stub)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  _Stub.requests = []
  yield f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def test_openai_grader_against_a_stub_server(stub_server, tiny_pair, monkeypatch):
  monkeypatch.setenv("NEURODIFF_GRADER_KEY", "sk-test")
  cfg = ml_collections.ConfigDict(get_config().grader.to_dict())
  cfg.kind, cfg.base_url, cfg.model, cfg.timeout_s = "openai", stub_server, "judge-1", 5.0
  g = graders.make_grader(cfg, tiny_pair)
  assert isinstance(g, graders.OpenAIGrader)
  assert g.relevant(["Ġmill", "bread", "▁Grain", "mill"]) == [True, False, True, True]
  assert len(_Stub.requests) == 3  # "mill" asked once
  assert g.coherence(["A fine sentence.", "zzz zzz zzz"]) == [0.0, 1.0]
  assert g.is_coherent(["A fine sentence.", "zzz zzz zzz"]) == [True, False]
  r = g.relevance(["mill", "bread"], probs=[0.9, 0.1])
  assert r["share"] == 0.5
  assert_close(r["weighted_share"], 0.9, c=rounding(n=2, u=U64), what="openai grader: weighted relevance share")
  first = _Stub.requests[0]
  assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
  assert first["body"]["model"] == "judge-1" and "milling" in first["body"]["messages"][-1]["content"]
  assert graders.chat_completions_url(stub_server + "/v1/") == stub_server + "/v1/chat/completions"


@pytest.mark.parametrize("listening", [False, True], ids=["refused", "silent"])
def test_an_unreachable_endpoint_says_nothing_is_lost_and_suggests_offline(listening):
  with socket.socket() as s:  # refused: bound, nobody listens; silent: accepts connections, never answers
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    if listening:
      s.listen(4)
    else:
      s.close()
    g = graders.OpenAIGrader(f"http://127.0.0.1:{port}", "judge-1", timeout_s=0.5, description="milling")
    with pytest.raises(graders.GraderUnavailable, match=rf"127\.0\.0\.1:{port}/v1/chat/completions.*"
                                                        r"nothing was lost.*grader\.kind=offline"):
      g.relevant(["mill"])


def test_make_grader_defaults_offline_and_checks_its_config(tiny_pair, monkeypatch):
  def no_network(*a, **k):
    raise AssertionError("the default grader touched the network")

  monkeypatch.setattr(graders.urllib.request, "urlopen", no_network)
  cfg = ml_collections.ConfigDict(get_config().grader.to_dict())
  g = graders.make_grader(cfg, tiny_pair)
  assert isinstance(g, graders.OfflineGrader) and g.quantile == 0.95
  assert g.relevant(["mill"]) == [True]
  cfg.kind = "ofline"
  with pytest.raises(ConfigError, match="did you mean offline"):
    graders.make_grader(cfg, tiny_pair)
  cfg.kind = "openai"
  with pytest.raises(ConfigError, match="base_url"):
    graders.make_grader(cfg, tiny_pair)
