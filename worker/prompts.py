"""Prompt embeddings kept between renders, so matrix variants, extra seeds and repeated prompts skip the text
encoder (and, on a staged plan, the trip of the encoder to the card).

An entry is one prompt's 512-token embedding in host memory: 512 x 7,680 bf16 values (7.5 MiB) for klein-4b,
512 x 12,288 (12 MiB) for klein-9b. The cache holds at most KILN_PROMPT_CACHE_MB of them (default 512 MiB:
about 68 4B prompts or 42 9B prompts) and drops the least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

Key = tuple[str, str]  # (model, prompt)


class PromptCache:
    """Prompt embeddings by model and prompt text, least recently used out first, within a byte budget."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Key, torch.Tensor] = OrderedDict()

    def get(self, model: str, prompt: str) -> torch.Tensor | None:
        """The embedding, or None; counts hits and misses."""
        found = self._entries.get((model, prompt))
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end((model, prompt))
        return found

    def put(self, model: str, prompt: str, embedding: torch.Tensor) -> None:
        """Keep a host copy of `embedding`; evict the oldest entries past the budget."""
        size = embedding.numel() * embedding.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop((model, prompt), None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._entries[(model, prompt)] = embedding.detach().to("cpu", copy=True)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def __len__(self) -> int:
        return len(self._entries)
