"""Batched greedy generation of ``rhythm probe``: responses, and continuations after a replaced token.

Rows are token-id lists of different lengths; each micro-batch is left-padded (transformers' generate
derives the positions from the attention mask) and decoded greedily. A row stops at its first EOS (kept)
or after its own budget of new tokens; greedy decoding does not depend on the budget, so one micro-batch
generates its largest budget and each row is cut to its own.
"""
from __future__ import annotations

import torch

from rhythm.app.common import pad_id


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a response: the generation config's EOS id(s) and the tokenizer's."""
    ids = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _cut(tokens: list[int], budget: int, stop: set[int]) -> list[int]:
    out = []
    for token in tokens[:budget]:
        out.append(token)
        if token in stop:
            break
    return out


def greedy(model, tokenizer, rows: list[list[int]], budgets: list[int], *, batch_size: int,
           progress=None) -> list[list[int]]:
    """Greedy continuation of every row: new token ids [len <= budget], ending at the first EOS if any.

    rows: token ids (each non-empty). budgets: new tokens allowed per row (0 gives []). progress: optional
    callable(n_rows_done) after each micro-batch. Rows are batched in order of length (less padding)."""
    if len(rows) != len(budgets):
        raise ValueError(f"rows and budgets must pair up, got {len(rows)} and {len(budgets)}")
    stop = eos_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    out: list[list[int] | None] = [[] if b <= 0 else None for b in budgets]
    todo = sorted((i for i, b in enumerate(budgets) if b > 0), key=lambda i: (len(rows[i]), i))
    for first in range(0, len(todo), batch_size):
        chunk = todo[first:first + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(chunk):
            ids[j, width - len(rows[i]):] = torch.tensor(rows[i], dtype=torch.long)
            mask[j, width - len(rows[i]):] = 1
        with torch.inference_mode():
            generated = model.generate(ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max(budgets[i] for i in chunk), do_sample=False,
                                       pad_token_id=pad, eos_token_id=sorted(stop) or None)
        for j, i in enumerate(chunk):
            out[i] = _cut(generated[j, width:].tolist(), budgets[i], stop)
        if progress is not None:
            progress(len(chunk))
    return out
