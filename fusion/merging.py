"""Weight merging of models that share one architecture and one tokenizer: the reference points
FuseLLM compares with where the sources are fine-tunes of a common base.

- `linear_merge`: the weighted average of the models' parameters (model soups, Wortsman et al.).
- `ties_merge`: TIES-Merging (Yadav et al., NeurIPS 2023) on task vectors tau_i = theta_i -
  theta_base: keep each task vector's `density` share of entries with the largest magnitude
  (over the whole model, as the paper's code does), elect one sign per parameter entry (the sign
  of the sum of the trimmed task vectors), average the entries that agree with it, and add
  `scale` times that to the base.

Both take and return state dicts (name -> tensor); `merge_folders` does the whole job on
Hugging Face model folders. Integer buffers (position ids and the like) are copied from the
first model, never averaged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from fusion.errors import FusionError


def _check(states: list[dict], base: dict | None = None) -> list[str]:
    if not states:
        raise FusionError("merging: no models to merge")
    names = list(states[0])
    for i, s in enumerate(states[1:] + ([base] if base is not None else []), 1):
        if list(s) != names or any(s[n].shape != states[0][n].shape for n in names):
            raise FusionError(f"merging: model {i} does not have the same parameters and shapes as model 0")
    return names


def linear_merge(states: list[dict], weights: list[float] | None = None) -> dict:
    """sum_i w_i theta_i with weights normalised to 1 (uniform by default)."""
    names = _check(states)
    w = torch.tensor(weights if weights is not None else [1.0] * len(states), dtype=torch.float64)
    if len(w) != len(states) or (w < 0).any() or w.sum() <= 0:
        raise FusionError(f"merging: need {len(states)} non-negative weights with a positive sum, got {weights}")
    w = w / w.sum()
    out = {}
    for n in names:
        first = states[0][n]
        if not first.is_floating_point():
            out[n] = first.clone()
            continue
        out[n] = sum(wi * s[n].double() for wi, s in zip(w.tolist(), states)).to(first.dtype)
    return out


def ties_merge(base: dict, states: list[dict], density: float = 0.2, scale: float = 1.0) -> dict:
    """TIES-Merging of fine-tunes `states` of `base` (see the module doc)."""
    names = _check(states, base)
    if not 0.0 < density <= 1.0:
        raise FusionError(f"merging: TIES density must be in (0, 1], got {density}")
    floats, alias, seen = [], {}, {}
    for n in names:  # tied weights (embeddings = output layer) share storage: count them once
        if base[n].is_floating_point():
            key = base[n].untyped_storage().data_ptr()
            if key in seen:
                alias[n] = seen[key]
            else:
                seen[key] = n
                floats.append(n)
    # task vectors, flattened over the whole model
    taus = [torch.cat([(s[n].double() - base[n].double()).reshape(-1) for n in floats]) for s in states]
    trimmed = []
    for tau in taus:
        keep = max(1, round(density * tau.numel()))
        threshold = tau.abs().kthvalue(tau.numel() - keep + 1).values  # the keep-th largest magnitude
        trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    merged = torch.where(count > 0, (stacked * agree).sum(0) / count.clamp_min(1), torch.zeros_like(sign))
    out, offset = {}, 0
    for n in names:
        if n in alias:
            continue
        if n not in floats:
            out[n] = base[n].clone()
            continue
        size = base[n].numel()
        out[n] = (base[n].double() + scale * merged[offset : offset + size].reshape(base[n].shape)).to(base[n].dtype)
        offset += size
    for n, first in alias.items():
        out[n] = out[first]
    return {n: out[n] for n in names}


def merge_folders(folders: list[Path], out: Path, method: str = "linear", base: Path | None = None,
                  weights: list[float] | None = None, density: float = 0.2, scale: float = 1.0) -> Path:
    """Merge Hugging Face model folders into `out` (config and tokenizer files from the first)."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(str(f), dtype=torch.float32) for f in folders]
    states = [m.state_dict() for m in models]
    if method == "linear":
        merged = linear_merge(states, weights)
    elif method == "ties":
        if base is None:
            raise FusionError("merging: TIES needs the base model the others were fine-tuned from")
        merged = ties_merge(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).state_dict(),
                            states, density, scale)
    else:
        raise FusionError(f"merging: unknown method {method!r} (linear, ties)")
    model = models[0]
    model.load_state_dict(merged)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in Path(folders[0]).iterdir():  # tokenizer files travel with the model
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name in ("vocab.json", "merges.txt"):
            shutil.copy2(f, out / f.name)
    return out
