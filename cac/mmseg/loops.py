"""Resume without replaying data, and random draws that do not depend on who loaded a sample.

mmengine's ``IterBasedTrainLoop`` resumes at iteration N by reading, decoding and augmenting N
batches ("Advance dataloader N steps"). Its ``InfiniteSampler`` is a deterministic index stream per
seed and rank, so :class:`ResumableIterBasedTrainLoop` moves the sampler to its position instead and
loads nothing. The replayed batches also advanced the augmentations' random state; here each
sample's pipeline draws from a state seeded by (seed, position in the sample stream), and each
training step's own draws (dropout, drop path) from one seeded by (seed, iteration). A resumed run
then trains on exactly the batches, augmentations and masks of the uninterrupted one, and the number
of dataloader workers changes nothing.

Gradient accumulation (``micro_batches=k``, what ``--batch-per-gpu`` sets, with the optimizer
wrapper's ``accumulative_counts=k``): one iteration of the loop is one optimizer step over k
micro-batches. Iterations, and everything counted in them (``max_iters``, the val and checkpoint
intervals, the LR schedule, per-iteration hooks such as EMA, the logged steps), mean optimizer steps
whatever the per-GPU batch, and the step sees the same images in the same order as one batch of k
times the size.

``resolve_config`` writes the loop into every config, so mmseg's stock ``tools/train.py`` uses it too
(``custom_imports`` brings in ``cac``). Registered: the loop, :class:`PositionedInfiniteSampler` and
:class:`PositionSeededDataset` (which the loop puts around the configured ones).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import random
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from mmengine.dataset import InfiniteSampler
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop
from mmseg.registry import DATA_SAMPLERS, DATASETS, LOOPS

__all__ = ["StreamKey", "stream_seed", "seeded_rng", "PositionedInfiniteSampler", "PositionSeededDataset",
           "ResumableIterBasedTrainLoop", "LOOP_TYPE", "seekable_dataloader"]

LOOP_TYPE = "ResumableIterBasedTrainLoop"
SAMPLE_STREAM, STEP_STREAM = 0, 1  # independent seed streams: a sample's pipeline, a training step


class StreamKey(NamedTuple):
    """What the sampler yields: the dataset index and where it sits in the sample stream."""

    seed: int
    position: int  # in the stream of all ranks (rank r holds positions r, r + world, ...)
    index: int  # into the dataset


def stream_seed(seed: int, stream: int, position: int) -> int:
    """A 32-bit seed that depends only on (seed, stream, position)."""
    return int(np.random.SeedSequence([seed % 2**64, stream, position]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(value: int) -> Iterator[None]:
    """Python's ``random``, numpy's global RNG and torch's CPU RNG (what mmcv/mmseg transforms draw
    from) seeded with ``value`` inside the block, and given back their previous states after it."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(value)
    np.random.seed(value)
    torch.random.default_generator.manual_seed(value)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@DATA_SAMPLERS.register_module()
class PositionedInfiniteSampler(InfiniteSampler):
    """mmengine's ``InfiniteSampler`` stream, the same indices in the same order per seed and rank,
    yielded as :class:`StreamKey` and able to start at any position without drawing what came before.

    ``start``: samples of this rank's stream already consumed; ``None`` yields nothing until
    :meth:`seek` (a loop that learns its position after the dataloader is built).
    """

    def __init__(self, dataset, shuffle: bool = True, seed: Optional[int] = None, start: Optional[int] = 0) -> None:
        super().__init__(dataset, shuffle=shuffle, seed=seed)
        self.indices = iter(()) if start is None else self._keys(start)

    def seek(self, consumed: int) -> None:
        """Continue after ``consumed`` samples of this rank's stream."""
        self.indices = self._keys(consumed)

    def _keys(self, consumed: int) -> Iterator[StreamKey]:
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        epoch, order = -1, list(range(self.size))
        for position in range(self.rank + self.world_size * consumed, 2**63, self.world_size):
            wanted, offset = divmod(position, self.size)
            while epoch < wanted:  # skipped epochs cost one permutation each, no data
                perm = torch.randperm(self.size, generator=gen) if self.shuffle else None
                epoch += 1
                if epoch == wanted and perm is not None:
                    order = perm.tolist()
            yield StreamKey(self.seed, position, order[offset])


@DATASETS.register_module()
class PositionSeededDataset:
    """A dataset whose items, asked for by :class:`StreamKey`, go through the pipeline with the RNGs
    seeded from (seed, position): the same augmentation whichever process loads it and whenever.
    Plain indices pass through unseeded; everything else is the wrapped dataset's."""

    def __init__(self, dataset) -> None:
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset" or name.startswith("__"):  # unpickling (workers) asks before __init__ ran
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        if not isinstance(key, StreamKey):
            return self.dataset[key]
        with seeded_rng(stream_seed(key.seed, SAMPLE_STREAM, key.position)):
            return self.dataset[key.index]


def _is_infinite_sampler(sampler) -> bool:
    kind = sampler.get("type") if isinstance(sampler, dict) else None
    return kind in ("InfiniteSampler", "mmengine.InfiniteSampler", InfiniteSampler)


def seekable_dataloader(cfg) -> Optional[dict]:
    """The train dataloader config with the positioned sampler (held until the loop seeks it) and the
    seeded dataset, or None when it cannot be positioned (another sampler, a batch sampler)."""
    if not isinstance(cfg, dict) or cfg.get("batch_sampler") or not _is_infinite_sampler(cfg.get("sampler")):
        return None
    out = copy.copy(cfg)
    out["sampler"] = {**cfg["sampler"], "type": "PositionedInfiniteSampler", "start": None}
    out["dataset"] = dict(type="PositionSeededDataset", dataset=cfg["dataset"])
    return out


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` that resumes by moving the sampler, not by loading N batches, and seeds
    every training step from (seed, iteration). Same arguments as mmengine's loop. A dataloader that
    cannot be positioned (not an ``InfiniteSampler``) resumes mmengine's way, with a warning."""

    def __init__(self, runner, dataloader, max_iters: int, micro_batches: int = 1, **kwargs) -> None:
        if int(micro_batches) != micro_batches or micro_batches < 1:
            raise ValueError(f"train_cfg.micro_batches must be a positive integer, got {micro_batches!r}")
        self.micro_batches = int(micro_batches)
        positioned = seekable_dataloader(dataloader)
        self._seekable = positioned is not None
        # The held sampler yields nothing until run() seeks it, so the iterator mmengine's __init__
        # makes (and its workers' prefetch) loads no batch.
        super().__init__(runner, positioned if self._seekable else dataloader, max_iters, **kwargs)

    def _check_accumulation(self) -> None:
        """The optimizer wrapper steps once per iteration's micro-batches, and counts them as such."""
        k = self.micro_batches
        wrapper = self.runner.optim_wrapper
        counts = getattr(wrapper, "_accumulative_counts", None)
        if counts is not None and counts != k:
            raise ValueError(f"train_cfg.micro_batches={k} needs optim_wrapper.accumulative_counts={k}, "
                             f"got {counts}")
        if k > 1:
            if not self._seekable:
                raise ValueError("train_cfg.micro_batches > 1 needs the train sampler to be an InfiniteSampler")
            wrapper.initialize_count_status(self.runner.model, self._iter * k, self._max_iters * k)

    def run(self):
        self._check_accumulation()
        if not self._seekable:
            print_log("ResumableIterBasedTrainLoop: the train sampler is not an InfiniteSampler; a resume "
                      "replays the data as mmengine's loop does", logger="current", level=logging.WARNING)
            return super().run()
        self.runner.call_hook("before_train")
        self.runner.call_hook("before_train_epoch")
        consumed = self._iter * self.dataloader.batch_size * self.micro_batches
        self.dataloader.sampler.seek(consumed)
        self.dataloader_iterator = iter(self.dataloader)  # the sampler is infinite: no restarts needed
        if self._iter > 0:
            print_log(f"Resumed the sample stream at iteration {self._iter}: {consumed} samples per rank "
                      "skipped without loading them", logger="current", level=logging.INFO)
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            if self.micro_batches == 1:
                self.run_iter(next(self.dataloader_iterator))
            else:
                self.run_iter([next(self.dataloader_iterator) for _ in range(self.micro_batches)])
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook("after_train_epoch")
        self.runner.call_hook("after_train")
        return self.runner.model

    def run_iter(self, data_batch) -> None:
        # dropout and drop-path masks from (seed, iteration), not from how far the RNG has run
        seed = stream_seed(int(self.runner.seed), STEP_STREAM, self._iter)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        if self.micro_batches == 1:
            return super().run_iter(data_batch)
        return self._accumulated_iter(data_batch)

    def _accumulated_iter(self, micro: list) -> None:
        """One optimizer step over the micro-batches: each one's forward and backward (the wrapper
        scales the losses by 1/k, skips DDP's gradient sync and steps on the last), then the hooks
        once, with the whole step's batch and its losses averaged over the micro-batches."""
        whole = {key: [item for batch in micro for item in batch[key]] for key in micro[0]}
        self.runner.call_hook("before_train_iter", batch_idx=self._iter, data_batch=whole)
        outputs = [self.runner.model.train_step(batch, optim_wrapper=self.runner.optim_wrapper) for batch in micro]
        merged = {key: sum(out[key] for out in outputs) / len(outputs) for key in outputs[0]}
        self.runner.call_hook("after_train_iter", batch_idx=self._iter, data_batch=whole, outputs=merged)
        self._iter += 1
