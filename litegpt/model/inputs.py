"""Model inputs: rendered samples -> token batches with image slots, built from the tokenizer and a few lengths.

Follows the grammar's prompt: one BOS, the prompt's text around `<ImageHere>` tokenised in segments,
image slots (filled with the projected image embeddings by the model) in place of the placeholder, then
the answer and EOS. Labels cover the answer tokens (and EOS) only. Training batches are right-padded,
generation batches left-padded. An answer cut by `max_answer_tokens` or `max_length` is counted in
`Batch.truncated`; a sample whose answer does not fit at all is removed from the batch and its key listed
in `Batch.dropped` (never trained on as an empty target). A batch that loses every sample is a
configuration error (`max_length` too small for the prompt) and raises.

Needs no model: the data stream builds batches in its loader workers from the tokenizer alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from litegpt.grammar import IMAGE_PLACEHOLDER
from litegpt.model.config import ConfigError, ModelConfig, Visual
from litegpt.model.encoders import backbone_geometry

IGNORE_INDEX = -100


@dataclass
class TrainSample:
    """One sample for a training batch: rendered prompt and answer, and its visual input per encoder."""

    key: str
    prompt: str
    answer: str
    visual: dict[str, torch.Tensor]  # encoder name -> features [tokens, width] (cache) or pixels [3, H, W] (live)
    source: Visual


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]; image slots hold the pad id
    image_mask: torch.Tensor  # [B, L] bool: where image embeddings go
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor | None  # [B, L], IGNORE_INDEX outside the answer; None for generation
    visual: dict[str, torch.Tensor]  # per encoder, stacked over the kept samples
    source: Visual
    keys: list[str]
    truncated: int = 0  # answers cut short (still trained on, without their end)
    dropped: list[str] = field(default_factory=list)  # samples removed: no answer token fitted

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """On `device`; `non_blocking` copies from pinned memory without waiting for the GPU's queue."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies (the DataLoader calls this with `pin_memory=True`), so that the copy to the GPU
        runs alongside the previous step instead of stalling the host."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return Batch(fn(self.input_ids), fn(self.image_mask), fn(self.attention_mask),
                     None if self.labels is None else fn(self.labels), {k: fn(v) for k, v in self.visual.items()},
                     self.source, self.keys, self.truncated, list(self.dropped))


class InputBuilder:
    """Token assembly for prompts with one `<ImageHere>`; see the module docstring for the rules."""

    def __init__(self, tokenizer, image_tokens: int, max_length: int, max_answer_tokens: int):
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.max_length = max_length
        self.max_answer_tokens = max_answer_tokens
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        if self.bos is None or self.eos is None:
            raise ConfigError("the tokenizer needs BOS and EOS tokens")
        self.pad = next(t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, self.eos) if t is not None)
        self._prompts: dict[str, tuple[list[int], list[int]]] = {}

    @classmethod
    def for_model(cls, cfg: ModelConfig, tokenizer) -> InputBuilder:
        """The assembly a model of this config reads: one image slot per merged visual token."""
        return cls(tokenizer, backbone_geometry(cfg.vision)[0] // cfg.merge.k, cfg.llm.max_length,
                   cfg.llm.max_answer_tokens)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image placeholder (memoised: prompts repeat)."""
        if prompt not in self._prompts:
            parts = prompt.split(IMAGE_PLACEHOLDER)
            if len(parts) != 2:
                raise ValueError(f"a prompt needs exactly one {IMAGE_PLACEHOLDER}, got {len(parts) - 1}: {prompt!r}")
            self._prompts[prompt] = (self._ids(parts[0]), self._ids(parts[1]))
        return self._prompts[prompt]

    def _row(self, prompt: str, answer_ids: list[int]) -> tuple[list[int], list[bool], list[int]]:
        before, after = self.prompt_ids(prompt)
        ids = [self.bos, *before, *[self.pad] * self.image_tokens, *after]
        image = [False] * (1 + len(before)) + [True] * self.image_tokens + [False] * len(after)
        labels = [IGNORE_INDEX] * len(ids) + answer_ids
        return ids + answer_ids, image + [False] * len(answer_ids), labels

    def train_batch(self, samples: Sequence[TrainSample]) -> Batch:
        rows, kept, truncated, dropped = [], [], 0, []
        for sample in samples:
            answer = [*self._ids(sample.answer), self.eos]
            prompt_len = 1 + sum(map(len, self.prompt_ids(sample.prompt))) + self.image_tokens
            room = min(self.max_answer_tokens, self.max_length - prompt_len)
            if room <= 0:
                dropped.append(sample.key)
                continue
            if len(answer) > room:
                truncated += 1
                answer = answer[:room]
            rows.append(self._row(sample.prompt, answer))
            kept.append(sample)
        if not kept:
            raise ConfigError(f"no sample of this batch fits: the prompt alone reaches llm.max_length = "
                              f"{self.max_length} tokens; raise it")
        length = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        image_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, image, lab) in enumerate(rows):  # right padding
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            labels[i, :n] = torch.tensor(lab)
            image_mask[i, :n] = torch.tensor(image)
            attention[i, :n] = 1
        visual, source = _stack_visual(kept)
        return Batch(input_ids, image_mask, attention, labels, visual, source, [s.key for s in kept],
                     truncated, dropped)

    def generation_batch(self, keys: Sequence[str], prompts: Sequence[str], visual: Sequence[dict[str, torch.Tensor]],
                         source: Visual) -> Batch:
        samples = [TrainSample(k, p, "", v, source) for k, p, v in zip(keys, prompts, visual)]
        rows = [self._row(s.prompt, []) for s in samples]
        length = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        image_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, image, _) in enumerate(rows):  # left padding
            n = len(ids)
            input_ids[i, length - n:] = torch.tensor(ids)
            image_mask[i, length - n:] = torch.tensor(image)
            attention[i, length - n:] = 1
        visual, source = _stack_visual(samples)
        return Batch(input_ids, image_mask, attention, None, visual, source, list(keys))


def _stack_visual(samples: Sequence[TrainSample]) -> tuple[dict[str, torch.Tensor], Visual]:
    source = samples[0].source
    if any(s.source != source for s in samples):
        raise ValueError("every sample of a batch needs the same visual input (cached features or pixels, not a mix)")
    return {name: torch.stack([s.visual[name] for s in samples]) for name in samples[0].visual}, source
