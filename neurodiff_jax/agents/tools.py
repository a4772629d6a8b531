"""The agents' tools: narrow functions over a model pair and its results files, with budgets.

A `Toolbox` serves one agent run. Every agent type may ask the models (`ask_model`: each prompt to
the fine-tuned model and the base, sampled; one model query per prompt). A `diff` agent also reads
the diffing results of the pair (ADL logit-lens and patchscope tokens, ADL steered samples,
logit-diff amplified samples, per-token KL contexts, a crosscoder run's model-specific latents) and
may steer the fine-tuned model with δ_p (one model query per prompt). The tools never read the
organism card or anything computed from it (the relevance columns the ADL writes with the card's
vocabulary are dropped, and the patchscope scale is picked by agreement), so an agent cannot read
the answer off the results. Results are JSON text cut to `max_chars`.

Budgets (as in the reference toolkit): `model_queries` counts prompts sent to the models,
`tool_calls` counts calls of any tool. A call over budget is refused with a `ToolError` naming what
is left; the loop records it and the agent must answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

AGENT_TYPES = ("blackbox", "diff")
MODEL_TOOLS = ("ask_model", "steer")  # the tools that spend model queries
FINAL = "final_answer"


class ToolError(Exception):
  """A tool refused or failed: the message goes back to the agent as the tool's result."""


@dataclasses.dataclass
class Budget:
  """What one agent run may spend: prompts to the models and tool calls."""

  model_queries: int = 20
  tool_calls: int = 30


def _schema(name: str, description: str, properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
  return {"type": "function", "function": {"name": name, "description": description, "parameters": {
      "type": "object", "properties": properties, "required": list(required), "additionalProperties": False}}}


_PROMPTS = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 8,
            "description": "prompts, one user turn each"}
_FORMAT = {"type": "string", "enum": ["chat", "text"],
           "description": "chat: each prompt as a user turn in the chat template (the default when the tokenizer has "
                          "one); text: plain text the model continues (a base model's format)"}
SPECS: dict[str, dict[str, Any]] = {
    "ask_model": _schema(
        "ask_model", "Send prompts to the fine-tuned model and to its base; returns both replies per prompt. "
        "Costs one model query per prompt.", {"prompts": _PROMPTS, "format": _FORMAT}, ["prompts"]),
    "adl_tokens": _schema(
        "adl_tokens", "Activation Difference Lens: the tokens the mean activation difference (fine-tuned minus "
        "base, on unrelated text, at the first positions) promotes, read with the logit lens and with a "
        "patchscope, per layer and position.",
        {"position": {"type": ["integer", "null"], "description": "one position (default: all)"},
         "top_k": {"type": "integer", "minimum": 1, "maximum": 50, "description": "tokens per reading (default 20)"}}),
    "adl_steered_samples": _schema(
        "adl_steered_samples", "Samples of the fine-tuned model steered along the mean activation difference "
        "(at the strongest strength that stayed coherent), beside unsteered ones.", {}),
    "amplified_samples": _schema(
        "amplified_samples", "Samples generated from the amplified logit difference "
        "ℓ_ft + α (ℓ_ft − ℓ_base) for several α (α = 0: the fine-tuned model).", {}),
    "kl_contexts": _schema(
        "kl_contexts", "The text positions where the fine-tuned and base models' next-token distributions differ "
        "most (KL), with each model's top next token.",
        {"top_k": {"type": "integer", "minimum": 1, "maximum": 50, "description": "contexts (default 10)"}}),
    "crosscoder_latents": _schema(
        "crosscoder_latents", "A crosscoder's latents that are specific to the fine-tuned model (or to the base), "
        "with the contexts where each fires most.",
        {"top_k": {"type": "integer", "minimum": 1, "maximum": 30, "description": "latents (default 8)"}}),
    "steer": _schema(
        "steer", "Generate with the fine-tuned model while adding the mean activation difference of one position "
        "(scaled to alpha times the layer's typical norm). Costs one model query per prompt.",
        {"prompts": _PROMPTS, "format": _FORMAT,
         "position": {"type": "integer", "description": "the δ position (default 0)"},
         "alpha": {"type": "number", "minimum": 0, "maximum": 32, "description": "strength (default: the ADL's "
                                                                                  "coherent choice, else 1)"}},
        ["prompts"]),
    FINAL: _schema(
        FINAL, "Give your final answer and end the investigation.",
        {"objective": {"type": "string", "description": "what the model was fine-tuned to do or on (one or two "
                                                        "sentences)"},
         "details": {"type": "array", "items": {"type": "string"}, "description": "the specific details you found: "
                                                                                   "words, facts, names, behaviours"}},
        ["objective", "details"]),
}
DIFF_TOOLS = ("adl_tokens", "adl_steered_samples", "amplified_samples", "kl_contexts", "crosscoder_latents", "steer")


def tool_names(agent: str) -> list[str]:
  """The tools an agent type may call (the final answer included)."""
  if agent not in AGENT_TYPES:
    raise ValueError(f"agent type {agent!r} is not one of {', '.join(AGENT_TYPES)}.")
  return ["ask_model"] + (list(DIFF_TOOLS) if agent == "diff" else []) + [FINAL]


def parse_arguments(raw: Any) -> dict[str, Any]:
  """A tool call's arguments as a dict (they arrive as JSON text); ToolError naming the problem otherwise."""
  if isinstance(raw, dict):
    return raw
  if raw is None or (isinstance(raw, str) and not raw.strip()):
    return {}
  try:
    value = json.loads(raw)
  except (TypeError, json.JSONDecodeError) as e:
    raise ToolError(f"the arguments are not valid JSON ({e}): {str(raw)[:120]!r}; send a JSON object.") from None
  if not isinstance(value, dict):
    raise ToolError(f"the arguments must be a JSON object, not {type(value).__name__}.")
  return value


def _check_keys(name: str, args: dict[str, Any]) -> None:
  props = SPECS[name]["function"]["parameters"]
  unknown = sorted(set(args) - set(props["properties"]))
  if unknown:
    raise ToolError(f"{name} has no argument {', '.join(unknown)}; its arguments: "
                    f"{', '.join(props['properties']) or 'none'}.")
  missing = [k for k in props["required"] if k not in args]
  if missing:
    raise ToolError(f"{name} needs {', '.join(missing)}.")


def _prompts(args: dict[str, Any]) -> list[str]:
  prompts = args.get("prompts")
  if isinstance(prompts, str):
    prompts = [prompts]
  if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
    raise ToolError("prompts must be a non-empty list of non-empty strings.")
  if len(prompts) > 8:
    raise ToolError(f"at most 8 prompts per call ({len(prompts)} given).")
  return prompts


def _int(args: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
  v = args.get(key, default)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or not lo <= int(v) <= hi:
    raise ToolError(f"{key}={v!r} must be an integer in [{lo}, {hi}].")
  return int(v)


def _read(path: Path, what: str, command: str) -> pd.DataFrame:
  if not path.is_file():
    raise ToolError(f"no {what} for this model pair ({path.name} missing); it is made by {command}.")
  return pd.read_parquet(path)


class Toolbox:
  """The tools of one agent run over a pair (loaded on first use) and its diff results directory."""

  def __init__(self, agent: str, budget: Budget, *, pair: Callable[[], Any] | Any, diff_dir: str | Path | None = None,
               crosscoder_dir: str | Path | None = None, new_tokens: int = 48, temperature: float = 0.8,
               seed: int = 0, max_chars: int = 6000):
    self.names = tool_names(agent)
    self.agent, self.budget = agent, budget
    self._pair, self._loaded = pair, None
    self.diff_dir = Path(diff_dir) if diff_dir else None
    self.crosscoder_dir = Path(crosscoder_dir) if crosscoder_dir else None
    self.new_tokens, self.temperature, self.seed, self.max_chars = int(new_tokens), float(temperature), int(seed), \
        int(max_chars)
    self.used = {"model_queries": 0, "tool_calls": 0}
    self._queries = 0  # sampling stream position: a resumed run draws new samples, not the same ones again

  # ---------------------------------------------------------------------------------------------- plumbing

  @property
  def pair(self) -> Any:
    """The model pair (a ModelPair), loaded when a tool first needs the models."""
    if self._loaded is None:
      self._loaded = self._pair() if callable(self._pair) else self._pair
    return self._loaded

  def specs(self) -> list[dict[str, Any]]:
    """The OpenAI tool schemas of this agent type."""
    return [SPECS[n] for n in self.names]

  def remaining(self) -> dict[str, int]:
    """What is left of the budget."""
    return {"model_queries": self.budget.model_queries - self.used["model_queries"],
            "tool_calls": self.budget.tool_calls - self.used["tool_calls"]}

  def restore(self, used: dict[str, int]) -> None:
    """Counts spent before a resume (from the transcript)."""
    self.used = {k: int(used.get(k, 0)) for k in self.used}
    self._queries = self.used["model_queries"]

  def call(self, name: str, raw_arguments: Any) -> str:
    """Runs tool `name` on its (JSON) arguments and returns the result as JSON text; ToolError otherwise."""
    if name not in self.names:
      extra = " (a diff tool: this agent only chats with the models)" if name in DIFF_TOOLS else ""
      raise ToolError(f"unknown tool {name!r}{extra}; tools: {', '.join(self.names)}.")
    if name == FINAL:
      raise ToolError("final_answer is handled by the agent loop.")
    args = parse_arguments(raw_arguments)
    _check_keys(name, args)
    if self.used["tool_calls"] >= self.budget.tool_calls:
      raise ToolError(f"the tool-call budget ({self.budget.tool_calls}) is spent; give your final answer now.")
    cost = len(_prompts(args)) if name in MODEL_TOOLS else 0
    left = self.budget.model_queries - self.used["model_queries"]
    if cost > left:
      raise ToolError(f"{name} with {cost} prompt(s) needs {cost} model queries but {left} are left; send fewer "
                      "prompts or give your final answer.")
    self.used["tool_calls"] += 1
    result = getattr(self, f"_{name}")(args)
    self.used["model_queries"] += cost
    text = json.dumps(result, ensure_ascii=False, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    if len(text) > self.max_chars:
      text = text[:self.max_chars] + f" … [cut at {self.max_chars} characters]"
    return text

  # --------------------------------------------------------------------------------------------- the models

  def _format(self, args: dict[str, Any]) -> str:
    has_template = bool(getattr(self.pair.tokenizer, "chat_template", None))
    fmt = args.get("format") or ("chat" if has_template else "text")
    if fmt not in ("chat", "text"):
      raise ToolError(f"format={fmt!r} must be chat or text.")
    if fmt == "chat" and not has_template:
      raise ToolError("this model's tokenizer has no chat template; use format text.")
    return fmt

  def _generate(self, model: Any, prompts: Sequence[str], additions: np.ndarray | None = None,
                layer: int = -1, fmt: str = "chat") -> list[str]:
    from neurodiff_jax.models.generate import cut_at_stop, encode_prompt, sample_generate, stop_ids

    tok = self.pair.tokenizer
    ids = [encode_prompt(tok, p, chat=fmt == "chat") for p in prompts]
    pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 0
    if additions is None:
      out = sample_generate(model, ids, self.new_tokens, seed=self.seed * 100_003 + self._queries,
                            temperature=self.temperature, pad_id=int(pad), batch_size=len(ids))
    else:
      from neurodiff_jax.diffing.adl import steered_generate

      out = steered_generate(model, ids, [layer] * len(ids), additions, self.new_tokens, int(pad))
    stops = stop_ids(tok)
    return [tok.decode(cut_at_stop(o, stops), skip_special_tokens=True).strip() for o in out]

  def _ask_model(self, args: dict[str, Any]) -> list[dict[str, str]]:
    prompts, fmt = _prompts(args), self._format(args)
    ft = self._generate(self.pair.ft, prompts, fmt=fmt)
    base = self._generate(self.pair.base, prompts, fmt=fmt)
    self._queries += len(prompts)
    return [{"prompt": p, "format": fmt, "finetuned": f, "base": b} for p, f, b in zip(prompts, ft, base)]

  def _steer(self, args: dict[str, Any]) -> dict[str, Any]:
    prompts, fmt = _prompts(args), self._format(args)
    means_path = self._diff("adl") / "means.npz"
    if not means_path.is_file():
      raise ToolError("no ADL mean difference for this pair (means.npz missing); it is made by launch.diff with "
                      "method adl.")
    means = dict(np.load(means_path))
    labels = [int(p) for p in means.get("positions", range(means["delta"].shape[1]))]
    pos = _int(args, "position", 0 if 0 in labels else labels[0], min(labels), max(labels))
    if pos not in labels:
      raise ToolError(f"position {pos} has no mean difference; positions: {labels}.")
    alpha = args.get("alpha")
    if alpha is None:
      alpha = self._chosen_alpha(pos)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= float(alpha) <= 32:
      raise ToolError(f"alpha={alpha!r} must be a number in [0, 32].")
    delta = means["delta"][0, labels.index(pos)]
    unit = delta / max(float(np.linalg.norm(delta)), 1e-30)
    add = float(alpha) * float(means["typical_norm_ft"][0]) * unit
    layer = int(means["layers"][0])
    texts = self._generate(self.pair.ft, prompts, np.tile(add, (len(prompts), 1)), layer, fmt)
    self._queries += len(prompts)
    return {"layer": layer, "position": pos, "alpha": float(alpha), "format": fmt,
            "samples": [{"prompt": p, "steered": t} for p, t in zip(prompts, texts)]}

  def _chosen_alpha(self, pos: int) -> float:
    path = self._diff("adl") / "steering.parquet"
    if path.is_file():
      t = pd.read_parquet(path)
      chosen = t[t.chosen & (t.position == pos)] if "chosen" in t else t.iloc[:0]
      if len(chosen):
        return float(chosen.alpha.iloc[0])
    return 1.0

  # ------------------------------------------------------------------------------------------ results files

  def _diff(self, method: str) -> Path:
    if self.diff_dir is None:
      raise ToolError("no diffing results directory was given for this pair; run launch.diff first.")
    return self.diff_dir / method

  def _adl_tokens(self, args: dict[str, Any]) -> list[dict[str, Any]]:
    top_k = _int(args, "top_k", 20, 1, 50)
    cmd = "launch.diff (method adl)"
    lens = _read(self._diff("adl") / "logit_lens.parquet", "ADL logit lens", cmd)
    patch = _read(self._diff("adl") / "patchscope.parquet", "ADL patchscope", cmd)
    positions = sorted(set(lens.position.tolist()))
    want = args.get("position")
    if want is not None:
      want = _int(args, "position", 0, -64, 4096)
      if want not in positions:
        raise ToolError(f"position {want} was not read; positions: {positions}.")
      positions = [want]
    out = []
    for (layer, pos), part in lens[lens.sign == "+"].groupby(["layer", "position"]):
      if pos not in positions:
        continue
      row: dict[str, Any] = {"layer": int(layer), "position": int(pos),
                             "logit_lens": part.sort_values("rank").token.head(top_k).tolist()}
      pp = patch[(patch.layer == layer) & (patch.position == pos)]
      if len(pp):
        # The scale whose prompts agree on most tokens (the ADL's own "best" uses the card: not shown here).
        counts = pp.groupby("scale").size()
        scale = float(counts[counts == counts.max()].index.min())
        row["patchscope_scale"] = scale
        row["patchscope"] = pp[pp.scale == scale].sort_values("rank").token.head(top_k).tolist()
      out.append(row)
    return out

  def _adl_steered_samples(self, args: dict[str, Any]) -> list[dict[str, Any]]:
    t = _read(self._diff("adl") / "steering.parquet", "ADL steering samples", "launch.diff (method adl)")
    keep = t[~t.steered | t.chosen] if "chosen" in t and t.chosen.any() else t
    return [{"steered": bool(r.steered), "position": None if pd.isna(r.position) else int(r.position),
             "alpha": float(r.alpha), "prompt": r.prompt, "text": r.text} for r in keep.itertuples()]

  def _amplified_samples(self, args: dict[str, Any]) -> list[dict[str, Any]]:
    t = _read(self._diff("logit_diff") / "amplified.parquet", "amplified samples", "launch.diff (method logit_diff)")
    return [{"alpha": float(r.alpha), "prompt": r.prompt, "text": r.text} for r in t.itertuples()]

  def _kl_contexts(self, args: dict[str, Any]) -> list[dict[str, Any]]:
    top_k = _int(args, "top_k", 10, 1, 50)
    t = _read(self._diff("kl") / "kl_top_contexts.parquet", "per-token KL contexts", "launch.diff (method kl)")
    return [{"kl": round(float(r.kl), 4), "context": r.context, "finetuned_next": r.top_ft, "base_next": r.top_base}
            for r in t.sort_values("kl", ascending=False).head(top_k).itertuples()]

  def _crosscoder_latents(self, args: dict[str, Any]) -> dict[str, Any]:
    top_k = _int(args, "top_k", 8, 1, 30)
    if self.crosscoder_dir is None:
      raise ToolError("no crosscoder run was given for this pair (a crosscoder is trained on a base/chat pair: "
                      "python -m launch.train, then launch.analyze).")
    cmd = "python -m launch.analyze"
    latents = _read(self.crosscoder_dir / "latents.parquet", "crosscoder latent table", cmd)
    examples = _read(self.crosscoder_dir / "examples.parquet", "crosscoder examples", cmd)
    out: dict[str, Any] = {}
    for tag, name in (("chat_only", "finetuned_only"), ("base_only", "base_only")):
      part = latents[latents.tag == tag].sort_values("delta_norm", ascending=(tag == "base_only")).head(top_k)
      rows = []
      for r in part.itertuples():
        ex = examples[(examples.latent == r.latent) & (examples.group == "top")].sort_values("rank").head(3)
        rows.append({"latent": int(r.latent), "delta_norm": round(float(r.delta_norm), 3),
                     "contexts": ["".join(c) for c in ex.context_tokens],
                     "tokens": [c[int(i)] if 0 <= int(i) < len(c) else "" for c, i in
                                zip(ex.context_tokens, ex.context_index)]})
      out[name] = rows
    return out


__all__ = ["AGENT_TYPES", "DIFF_TOOLS", "FINAL", "MODEL_TOOLS", "SPECS", "Budget", "ToolError", "Toolbox",
           "parse_arguments", "tool_names"]
