"""Interpretability agents on the model organisms: `python -m launch.agent --config=agent[:ORGANISM[,SCALE]]`.

  python -m launch.agent --config=agent:narrow,small                # offline readers, 3 seeds, graded offline
  python -m launch.agent --config=agent:all,small                   # all four organisms, then the comparison
  python -m launch.agent --config=agent:taboo --config.kind=llm \
      --config.llm.base_url=http://localhost:8000/v1 --config.llm.model=NAME   # key in $NEURODIFF_AGENT_KEY
  python -m launch.agent --config=agent --config.finetuned_model=/ckpt/it --config.base_model=/ckpt/base

`arg` names the organism (narrow, chat, false_fact, taboo, all; default narrow) and the scale
(default, small, gemma3). Each agent type (blackbox: chats with the models; diff: also reads the
diffing results) runs once per seed with the same budget; answers are graded against the organism
card. Results go to `<root>/agents/` (root = the demo's results root, which the dashboard opens):
transcripts, answers, grades, scores.parquet and, with several seeds and both agent types, the
hierarchical comparison (comparison.parquet / .png / .json). Finished runs are reused.
"""

import ml_collections

from configs import demo

ORGANISMS = ("narrow", "chat", "false_fact", "taboo")  # the order runs go in


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The agent config of one organism (or all) at one scale."""
  organism, _, scale = (arg or "narrow").partition(",")
  scale = scale or "default"
  if organism not in ORGANISMS + ("all",):
    raise ValueError(f"unknown organism {organism!r}; known: {', '.join(ORGANISMS)}, all.")
  d = demo.get_config(scale)  # ValueError naming the scales for an unknown one
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.root = ""  # the results root ("" = the demo's, $NEURODIFF_HOME/demo/<scale>); agents write <root>/agents
  c.organisms = d.organisms  # how organism:NAME models are built (the demo's organisms)
  c.targets = ORGANISMS if organism == "all" else (organism,)  # fine-tuned organisms, each compared with the base
  c.base_model = "organism:base"  # organism:NAME or a checkpoint directory
  c.finetuned_model = ""  # a checkpoint directory (or organism:NAME) instead of `targets`: one mystery pair
  c.diff = d.diff  # how the diffing results the diff agent reads are made (launch.diff; reused when done)
  with c.diff.unlocked():
    c.diff.methods = ("adl", "kl", "logit_diff")
  c.crosscoder_run = ""  # a crosscoder analysis dir of the pair ("" = <root>/runs/batchtopk/analysis for chat)
  c.kind = "offline"  # offline (the readers: no LLM) | llm (an OpenAI-compatible endpoint, `llm` below)
  c.agents = ("blackbox", "diff")  # agent types, each with the same budget
  c.seeds = (0, 1, 2)
  c.budget = ml_collections.ConfigDict({
      "model_queries": 12,  # prompts sent to the models (ask_model, steer)
      "tool_calls": 24,  # calls of any tool
  })
  c.generation = ml_collections.ConfigDict({"new_tokens": 40, "temperature": 0.8})  # the models' sampled replies
  c.llm = ml_collections.ConfigDict({
      "base_url": "",  # e.g. http://localhost:8000/v1 (vLLM, llama.cpp server, Ollama) or a hosted API
      "model": "",
      "key_env": "NEURODIFF_AGENT_KEY",  # the environment variable holding the API key (never the key itself)
      "timeout_s": 120.0,
      "retries": 2,  # retries of a failed request (timeouts, 429, 5xx), with backoff
      "temperature": 0.0,
      "max_tokens": 1024,
      "max_turns": 0,  # assistant turns at most (0 = tool_calls + 6)
  })
  c.grader = ml_collections.ConfigDict({
      "kind": "offline",  # offline (the rubric by word matching) | llm (the rubric read by a model)
      "base_url": "",  # "" = the agent's llm.base_url
      "model": "",  # "" = the agent's llm.model
  })
  c.comparison = ml_collections.ConfigDict({"num_warmup": 500, "num_samples": 1000, "num_chains": 2})
  c.force = False  # redo finished agent runs
  c.progress = True
  c.lock()
  return c
