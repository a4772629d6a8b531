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


def tiny_multimodal_gemma3_config(num_hidden_layers: int):
  """A tiny Gemma3ForConditionalGeneration config: the text model under a prefix, a one-layer SigLIP tower."""
  import transformers

  text = transformers.Gemma3TextConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, sliding_window=4)
  vision = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
  return transformers.Gemma3Config(
      text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
      image_token_index=299, boi_token_index=297, eoi_token_index=298)
