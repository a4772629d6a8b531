"""The `transformers` PyTorch reference: residual after each block (forward hooks) and logits."""

import numpy as np
import torch


def hf_forward(model, input_ids, attention_mask, hooks=None):
  """Runs the HF model with mask-derived position ids; returns (logits, [residual after block L])."""
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  residuals = []
  # Intervention hooks first, so the capture hooks see the patched residual (as ours does).
  handles = [model.model.layers[layer].register_forward_hook(fn) for layer, fn in (hooks or {}).items()]
  handles += [
      layer.register_forward_hook(lambda mod, args, out: residuals.append((out[0] if isinstance(out, tuple) else out).detach()))
      for layer in model.model.layers
  ]
  try:
    with torch.no_grad():
      out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
  finally:
    for h in handles:
      h.remove()
  return out, residuals
