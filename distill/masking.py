"""Dynamic MLM masking (Devlin et al. 2019; Sanh et al. 2019), redrawn for every example at every epoch.

Per sequence with n maskable tokens (special and padding tokens are never chosen), k positions are drawn
without replacement, k = floor(p*n + u) with u ~ U[0, 1) (so E[k] = p*n exactly, also for short
sequences). With smoothing s > 0 a token's selection weight is max(count, 1)^-s, its count taken over the
corpus (the original `distillation/` scripts' s = 0.7), which raises the share of rare tokens. Chosen
positions become [MASK] / a random token / themselves with probabilities mask_fraction / random_fraction / the rest.

All draws come from a generator seeded per example, so masks are reproducible under a seed and identical
whatever the number of processes or data-loader workers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from distill.recipes import MaskingConfig


def standard_masking(cfg: MaskingConfig) -> MaskingConfig:
    """BERT's uniform selection (no frequency smoothing), for held-out accuracy figures that compare
    across runs and for teacher adaptation."""
    return dataclasses.replace(cfg, smoothing=0.0)


def selection_weights(frequencies: np.ndarray | None, vocab_size: int, special_ids: list[int],
                      smoothing: float) -> torch.Tensor:
    """Per-token selection weight (V,): max(count, 1)^-smoothing, or 1; 0 for special tokens."""
    if frequencies is None or smoothing == 0:
        w = torch.ones(vocab_size, dtype=torch.float64)
    else:
        w = torch.from_numpy(np.maximum(frequencies[:vocab_size], 1).astype(np.float64)) ** -smoothing
    w[list(special_ids)] = 0.0
    return w


class MLMCollator:
    """Pads examples ({"input_ids": list[int], "seed": int}) to the longest and masks them.

    Returns input_ids (B, T), attention_mask (B, T) and labels (B, T): the original token at selected
    positions, -100 elsewhere (the transformers convention).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: MaskingConfig, frequencies: np.ndarray | None = None,
                 pad_to_multiple_of: int = 8):
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.masking_cfg = cfg
        self.weights = selection_weights(frequencies, self.vocab_size, tokenizer.all_special_ids, cfg.smoothing)
        # Random replacements are drawn among ordinary tokens, never [CLS]/[SEP]/[PAD]/[MASK].
        self.random_pool = torch.nonzero(selection_weights(None, self.vocab_size, tokenizer.all_special_ids, 0))[:, 0]
        self.multiple = pad_to_multiple_of

    def mask_sequence(self, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask one unpadded sequence (T,) -> (input_ids, labels)."""
        g = torch.Generator().manual_seed(seed)
        w = self.weights[ids]  # (T,)
        candidates = int((w > 0).sum())
        labels = torch.full_like(ids, -100)
        if candidates == 0:
            return ids.clone(), labels
        k = int(self.masking_cfg.probability * candidates + torch.rand((), generator=g, dtype=torch.float64))
        k = min(max(k, 0), candidates)
        if k == 0:
            return ids.clone(), labels
        chosen = torch.multinomial(w, k, replacement=False, generator=g)  # (k,)
        labels[chosen] = ids[chosen]
        out = ids.clone()
        action = torch.rand(k, generator=g)
        masked, replaced = self.masking_cfg.mask_fraction, self.masking_cfg.random_fraction
        to_mask = action < masked
        to_random = (action >= masked) & (action < masked + replaced)
        out[chosen[to_mask]] = self.mask_id
        n_random = int(to_random.sum())
        if n_random:
            out[chosen[to_random]] = self.random_pool[
                torch.randint(len(self.random_pool), (n_random,), generator=g)
            ]
        return out, labels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        T = max(len(e["input_ids"]) for e in examples)
        T = -(-T // self.multiple) * self.multiple
        B = len(examples)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, e in enumerate(examples):
            ids = torch.as_tensor(e["input_ids"], dtype=torch.long)
            masked, lab = self.mask_sequence(ids, int(e["seed"]))
            n = len(ids)
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = masked, lab, 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
