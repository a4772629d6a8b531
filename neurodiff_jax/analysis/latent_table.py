"""The latent table (`latents.parquet`): one row per latent, the columns other tools read.

Decoder and encoder norms, Δnorm and its class (docs/methods.md §3) in the models' original units;
frequency, maximum activation and template share from the streaming pass (`examples.LatentStats`);
the six β and two ν of latent scaling (§4, normalised space); and for live chat-only latents the
ν ranking of the paper's code (rank(ν^ε) + rank(ν^r), low = genuine) with its best and worst halves,
beside our fixed rule `genuine = ν^ε < nu_error_max and ν^r < nu_recon_max`.

A latent that never fired on the analysed tokens is tagged `dead` whatever its Δnorm, with
`freq` 0 and β, ν, template share NaN.

For M > 2 models, model 0 is the base and each model k ≥ 1 is compared with it: the pairwise
columns get the suffix `_m{k}` (`delta_norm_m2`, `beta_error_chat_m2`, `nu_error_m2`, `tag_m2`, ...);
for M = 2 they carry no suffix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from neurodiff_jax.crosscoder.metrics import delta_norm
from neurodiff_jax.crosscoder.model import Crosscoder

TAGS = ("chat_only", "base_only", "shared", "other", "dead")
COLUMNS = ("latent", "dec_norm_base", "dec_norm_chat", "delta_norm", "tag", "dec_cos", "enc_norm_base", "enc_norm_chat",
           "freq", "max_act", "beta_recon_base", "beta_recon_chat", "beta_error_base", "beta_error_chat",
           "beta_act_base", "beta_act_chat", "nu_recon", "nu_error", "template_share", "genuine")


def delta_norm_tags(dn: np.ndarray, live: np.ndarray) -> np.ndarray:
  """Each latent's tag: its Δnorm class (≥ 0.9 chat_only, ≤ 0.1 base_only, [0.4, 0.6] shared, else other) or dead."""
  tag = np.full(dn.shape, "other", dtype=object)
  tag[(dn >= 0.4) & (dn <= 0.6)] = "shared"
  tag[dn >= 0.9] = "chat_only"
  tag[dn <= 0.1] = "base_only"
  tag[~live] = "dead"
  return tag


def nu_ranking(nu_error: np.ndarray, nu_recon: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(rank(ν^ε) + rank(ν^r), "best"/"worst" half) over the `chosen` latents with finite ν; NaN / "" elsewhere."""
  ok = chosen & np.isfinite(nu_error) & np.isfinite(nu_recon)
  rank = np.full(nu_error.shape, np.nan)
  half = np.full(nu_error.shape, "", dtype=object)
  idx = np.flatnonzero(ok)
  if len(idx):
    r = pd.Series(nu_error[idx]).rank(method="average").to_numpy() + pd.Series(nu_recon[idx]).rank(
        method="average").to_numpy()
    rank[idx] = r
    order = idx[np.argsort(r, kind="stable")]
    half[order[: len(order) // 2]] = "best"  # low ν: the latent is not explained by the base model
    half[order[len(order) // 2:]] = "worst"
  return rank, half


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where((na > 0) & (nb > 0), np.einsum("md,md->m", a, b) / (na * nb), np.nan)


def latent_table(cc: Crosscoder, stats: dict[str, np.ndarray] | None, scaling: dict[str, np.ndarray] | None,
                 nu_error_max: float = 0.2, nu_recon_max: float = 0.5) -> pd.DataFrame:
  """The latent table from a crosscoder, the pass's statistics and latent scaling (either may be None: NaN columns)."""
  m, num = cc.cfg.dict_size, cc.cfg.num_models
  dec = cc.decoder().astype(np.float64)  # [m, M, d] original units
  enc = cc.encoder().astype(np.float64)  # [M, d, m]
  norms = np.linalg.norm(dec, axis=-1)  # [m, M]
  enc_norms = np.linalg.norm(enc, axis=1).T  # [m, M]
  nan = np.full(m, np.nan)
  if stats is not None:
    count = np.asarray(stats["count"])
    live = count > 0
    freq, max_act, share = stats["freq"], np.where(live, stats["max_act"], np.nan), stats["template_share"]
  else:  # no pass: liveness unknown, every latent counted live
    count, live, freq, max_act, share = np.full(m, -1), np.ones(m, bool), nan, nan, nan
  t = pd.DataFrame({"latent": np.arange(m, dtype=np.int64)})
  t["dec_norm_base"] = norms[:, 0]
  for k in range(1, num):
    sfx = "" if num == 2 else f"_m{k}"
    name = "chat" if num == 2 else f"m{k}"
    t[f"dec_norm_{name}"] = norms[:, k]
    dn = delta_norm(norms, 0, k)
    t[f"delta_norm{sfx}"] = dn
    t[f"tag{sfx}"] = delta_norm_tags(dn, live)
    t[f"dec_cos{sfx}"] = _cos(dec[:, 0], dec[:, k])
  t["enc_norm_base"] = enc_norms[:, 0]
  for k in range(1, num):
    t[f"enc_norm_{'chat' if num == 2 else f'm{k}'}"] = enc_norms[:, k]
  t["freq"] = freq
  t["max_act"] = max_act
  t["count"] = count
  for k in range(1, num):
    sfx = "" if num == 2 else f"_m{k}"
    p = k - 1
    cols = {}
    for target in ("recon", "error", "act"):
      for r, who in enumerate(("base", "chat")):
        v = nan.copy()
        if scaling is not None:
          v[scaling["latent"]] = scaling[f"beta_{target}"][p, r]
        cols[f"beta_{target}_{who}{sfx}"] = v
    for target in ("recon", "error"):
      v = nan.copy()
      if scaling is not None:
        v[scaling["latent"]] = scaling[f"nu_{target}"][p]
      cols[f"nu_{target}{sfx}"] = v
    for c, v in cols.items():
      t[c] = np.where(live, v, np.nan)
  t["template_share"] = np.where(live, share, np.nan)
  t["template_mass_share"] = np.where(live, stats["template_mass_share"], np.nan) if stats is not None else nan
  for k in range(1, num):
    sfx = "" if num == 2 else f"_m{k}"
    chat_only = (t[f"tag{sfx}"] == "chat_only").to_numpy()
    ne, nr = t[f"nu_error{sfx}"].to_numpy(), t[f"nu_recon{sfx}"].to_numpy()
    known = chat_only & np.isfinite(ne) & np.isfinite(nr)
    genuine = pd.array([None] * m, dtype="boolean")
    genuine[known] = (ne[known] < nu_error_max) & (nr[known] < nu_recon_max)
    t[f"genuine{sfx}"] = genuine
    rank, half = nu_ranking(ne, nr, chat_only)
    t[f"nu_rank{sfx}"] = rank
    t[f"nu_half{sfx}"] = half
  return t


def class_counts(table: pd.DataFrame, tag: str = "tag") -> dict[str, int]:
  """Count of each tag (live latents by Δnorm class, and dead)."""
  counts = table[tag].value_counts()
  return {k: int(counts.get(k, 0)) for k in TAGS}


__all__ = ["COLUMNS", "TAGS", "class_counts", "delta_norm_tags", "latent_table", "nu_ranking"]
