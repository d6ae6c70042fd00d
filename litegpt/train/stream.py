"""The training data stream: WebDataset shards -> batches of `TrainSample`, the same on every restart.

Per epoch: the shard list is shuffled with (seed, epoch), dealt round-robin to ranks, then to loader
workers; each worker cycles over its shards so that every rank yields exactly `micro_batches_per_epoch`
micro-batches (DeepSpeed hangs if one rank stops early; open_clip does the same); samples are shuffled in
a buffer and grouped by answer length to cut padding. Everything random is seeded from (seed, epoch), so
a resumed run skips the batches it had consumed and then sees exactly what an uninterrupted run would.

Built from the recipe and the model config alone (tokenizer, image slots, encoders' preprocessing): no
model is needed, and batches are collated in the loader workers. Prompts and answers are the shard set's
text: its `Grammar` (label vocabulary and task template, from manifest.json).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import webdataset as wds

from litegpt.data.shards import iter_json, read_manifest, read_samples
from litegpt.data.splits import Holdout
from litegpt.features import Decode, visual_decoder
from litegpt.grammar import Grammar
from litegpt.model.config import ModelConfig, Visual
from litegpt.model.encoders import ImagePreprocessor
from litegpt.model.inputs import InputBuilder, TrainSample
from litegpt.model.model import load_tokenizer
from litegpt.train.config import TrainConfig, stage_grammar, validation_holdout


@dataclass(frozen=True)
class StreamSpec:
    urls: tuple[str, ...]  # shard files of the split
    split: str
    n_samples: int  # samples per epoch before splitting across ranks (after the filters, x tasks)
    tasks: tuple[str, ...]
    grammar: Grammar  # renders the prompts and answers
    task_token: str | None
    findings_only: bool
    source: Visual  # what the shards in `urls` carry to the model: cached features or images
    micro_batch: int
    seed: int
    shuffle_buffer: int
    length_group: int
    num_workers: int
    holdout: Holdout | None  # validation images, never trained on

    @classmethod
    def from_recipe(cls, cfg: TrainConfig, source_dir: Path) -> StreamSpec:
        """The stage's split, read from `source_dir` (the shards, or their feature cache)."""
        holdout = validation_holdout(cfg)
        counts = eligible_counts(Path(cfg.data.shards), cfg.data.split, cfg.stage.findings_only, holdout)
        return cls(urls=tuple(str(Path(source_dir) / name) for name, n in counts.items() if n > 0),
                   split=cfg.data.split, n_samples=sum(counts.values()) * len(cfg.stage.tasks), tasks=cfg.stage.tasks,
                   grammar=stage_grammar(cfg), task_token=cfg.stage.task_token, findings_only=cfg.stage.findings_only, source=cfg.data.features,
                   micro_batch=cfg.train.micro_batch, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                   length_group=cfg.data.length_group, num_workers=cfg.data.num_workers, holdout=holdout)


def trained_on(meta: dict, split: str, findings_only: bool, holdout: Holdout | None) -> bool:
    """Whether a sample of `split` is trained on: not a validation image, and with findings when the stage
    trains on those only."""
    held_out = holdout is not None and not holdout.trains(split, meta["image_id"])
    return not held_out and (not findings_only or bool(meta["findings"]))


def eligible_counts(shards: Path, split: str, findings_only: bool, holdout: Holdout | None = None) -> dict[str, int]:
    """Per image shard of `split`, how many samples a stage trains on (`trained_on`).

    Shards with none are left out of the stream, so no loader worker can spin on an empty pass.
    """
    manifest = read_manifest(shards)
    shards_of_split = [s for s in manifest["shards"] if s["split"] == split]
    if not findings_only and (holdout is None or holdout.split != split):  # every sample: the manifest counts them
        return {s["name"]: s["samples"] for s in shards_of_split}
    return {s["name"]: sum(trained_on(m, split, findings_only, holdout) for m in iter_json(Path(shards) / s["name"]))
            for s in shards_of_split}


class TrainStream:
    """Collated batches for one rank; `epoch(e, skip)` is deterministic for a (seed, world size, workers)."""

    def __init__(self, spec: StreamSpec, rank: int, world_size: int, visual: Decode,
                 collate: Callable[[list[TrainSample]], object]):
        if len(spec.urls) < world_size:
            raise ValueError(f"{len(spec.urls)} shard(s) cannot feed {world_size} ranks: re-run `litegpt prepare` "
                             f"with a smaller --samples-per-shard (at least one shard per rank is needed)")
        self.spec, self.rank, self.world_size, self.visual = spec, rank, world_size, visual
        self.collate = collate  # runs in the loader workers: tokenising is off the training process
        self.micro_batches_per_epoch = spec.n_samples // (world_size * spec.micro_batch)  # this rank yields
        if self.micro_batches_per_epoch == 0:
            raise ValueError(f"{spec.n_samples} samples give no full batch of {spec.micro_batch} on each of "
                             f"{world_size} ranks; lower train.micro_batch or add data")

    @classmethod
    def from_recipe(cls, cfg: TrainConfig, model_cfg: ModelConfig, source_dir: Path, rank: int,
                    world_size: int) -> TrainStream:
        """The stage's stream for one rank: spec from the recipe, batches from the model config's tokenizer."""
        preprocess = ImagePreprocessor(model_cfg.vision) if cfg.data.features is Visual.LIVE else None
        return cls(StreamSpec.from_recipe(cfg, source_dir), rank, world_size,
                   visual_decoder(cfg.data.features, preprocess), InputBuilder.for_model(model_cfg, load_tokenizer(model_cfg.llm)).train_batch)

    def _samples(self, raw: dict) -> list[TrainSample]:
        meta = json.loads(raw["json"])
        if not trained_on(meta, self.spec.split, self.spec.findings_only, self.spec.holdout):
            return []
        visual, grammar = self.visual(raw), self.spec.grammar
        return [TrainSample(f"{meta['image_id']}/{task}",
                            grammar.prompt(task, self.spec.task_token if task == "identify" else None),
                            grammar.answer(task, meta), visual, self.spec.source) for task in self.spec.tasks]

    def _pipeline(self, epoch: int) -> wds.DataPipeline:
        spec = self.spec
        seed = spec.seed * 1_000_003 + epoch
        return wds.DataPipeline(
            wds.SimpleShardList(list(spec.urls)),
            wds.detshuffle(bufsize=len(spec.urls), initial=len(spec.urls), seed=seed, epoch=-1),
            _take_every(self.rank, self.world_size),
            wds.split_by_worker,
            _cycle(self._samples),
            wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, seed=seed * 7919 + self.rank),
            _length_batches(spec.micro_batch, spec.length_group, seed * 104729 + self.rank),
            wds.map(self.collate),
        )

    def _loader(self, epoch: int, skip: int, stop: int) -> Iterator:
        """Micro-batches `skip` to `stop` of `epoch` for this rank; its workers start right away."""
        workers = min(self.spec.num_workers, len(self.spec.urls[self.rank::self.world_size]))
        # Its own generator: the loader must not draw from the global RNG, which LoRA dropout uses and a
        # resumed run restores.
        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + epoch)
        loader = torch.utils.data.DataLoader(self._pipeline(epoch), batch_size=None, num_workers=workers,
                                             collate_fn=_as_is, persistent_workers=False, generator=generator,
                                             pin_memory=torch.cuda.is_available())
        return itertools.islice(iter(loader), skip, stop)

    def batches(self, epoch: int, skip: int = 0, per_epoch: int | None = None) -> Iterator[tuple[int, object]]:
        """(epoch, batch) from batch `skip` of `epoch` on, epoch after epoch, without end; `per_epoch` takes
        only the first so many of each epoch (the trainer uses whole optimizer steps).

        The next epoch's loader is started when an epoch begins, so its workers have forked and
        prefetched by the time it is needed (a fresh loader per epoch keeps every epoch's order exact).
        """
        stop = self.micro_batches_per_epoch if per_epoch is None else per_epoch
        current = self._loader(epoch, skip, stop)
        while True:
            upcoming = self._loader(epoch + 1, 0, stop)
            for batch in current:
                yield epoch, batch
            current, epoch = upcoming, epoch + 1


def _as_is(batch):
    return batch


def _take_every(rank: int, world_size: int):
    def stage(src):
        yield from itertools.islice(src, rank, None, world_size)

    return stage


def _cycle(to_samples: Callable[[dict], list[TrainSample]]):
    """Read a worker's shards over and over (the caller takes a fixed number of batches).

    Stops only if a whole pass gives no sample (e.g. no image with findings in these shards), which
    would otherwise spin forever.
    """
    def stage(src):
        shards = list(src)
        while shards:
            produced = 0
            for raw in read_samples(Path(shard["url"]) for shard in shards):
                for sample in to_samples(raw):
                    produced += 1
                    yield sample
            if produced == 0:
                return

    return stage


def _length_batches(micro_batch: int, group: int, seed: int):
    """Sort windows of `group` batches by answer length, cut them into batches, shuffle the batches."""
    def stage(src):
        rng = random.Random(seed)
        window: list[TrainSample] = []
        for sample in src:
            window.append(sample)
            if len(window) == micro_batch * group:
                window.sort(key=lambda s: len(s.answer))
                batches = [window[i:i + micro_batch] for i in range(0, len(window), micro_batch)]
                rng.shuffle(batches)
                yield from batches
                window = []

    return stage
