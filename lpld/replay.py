"""Replay stored label records as training batches, through torch or NVIDIA DALI (SPEC.md 5, 8, 11.1-11.3).

A training epoch is a list of global record ids g (``lpld.prune.plan``). ``PlanSampler`` holds the
epoch and yields that list in the main process; ``RecordDataset[g]`` rebuilds the batch the
teacher labelled for record g (same images in stored order, same crops, flips, cutout and
CutMix) together with its stored fp16 logits. With ``DataLoader(batch_size=None)`` each sampler
item is one whole batch, so workers stay persistent and no dataset state changes per epoch:
nothing is keyed by a first image index and no DataLoader internals are touched.

Two interchangeable back ends produce the same ``ReplayBatch`` for the same record:

* ``torch``: ``lpld.augment.replay``, the very function relabel ran before the teacher.
* ``dali``: a DALI pipeline fed per record by ``fn.external_source``: ``fn.slice`` (the stored
  integer box, of the uint8 pixels) -> float -> ``fn.resize`` (linear, no antialias, float) -> ``fn.flip`` -> ``fn.erase``
  (cutout) -> ``fn.multi_paste`` (CutMix: sample i pastes the stored box of sample perm[i] over
  itself; a pure copy, so it reproduces CutMix exactly, empty boxes included) -> normalize. It runs on the GPU, or on the CPU with ``device_id=None``.
  The float resize agrees with torch's to about one float32 rounding step (tests/test_replay.py).
"""
from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import augment, distributed
from .errors import UserError


class ReplayBatch(NamedTuple):
    """One replayed record: normalized images float32 [B, C, S, S], stored logits fp16 [B, K], its id."""

    images: torch.Tensor
    logits: torch.Tensor
    record: int


class PlanSampler(Sampler[int]):
    """Yields this rank's record ids of the current epoch's plan; the epoch lives here, not in the dataset.

    ``plan(epoch)`` must be a pure function (``lpld.prune.plan`` is), so the sampler's whole state
    is the epoch: ``state_dict`` goes into the training checkpoint and a resumed run replays the
    same records. With ``world_size`` ranks, rank r takes positions r, r + W, ... of the plan,
    truncated to a common length so every rank takes the same number of optimizer steps.
    """

    def __init__(self, plan: Callable[[int], Sequence[int]], epoch: int = 0, rank: int = 0, world_size: int = 1):
        self._plan = plan
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self._cached: tuple[int | None, list[int]] = (None, [])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def records(self, epoch: int) -> list[int]:
        """This rank's ids of ``epoch``; the last epoch's list is kept (the plan is pure, and DALI
        asks once per batch)."""
        if self._cached[0] != epoch:
            ids = [int(g) for g in self._plan(epoch)]
            steps = len(ids) // self.world_size
            self._cached = (epoch, ids[self.rank :: self.world_size][:steps])
        return self._cached[1]

    def __iter__(self) -> Iterator[int]:
        return iter(self.records(self.epoch))

    def __len__(self) -> int:
        return len(self.records(self.epoch))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


class RecordDataset(Dataset):
    """Map-style dataset whose keys are global record ids g; item g is the replayed batch of record g.

    ``images`` are all distilled images, uint8 [N, C, H, W] (the image bank's memory map, see
    ``lpld.bank``); forked workers share its pages;
    ``store`` is anything with ``record(g) -> augment.Record`` (a ``lpld.labels.LabelStore``).
    """

    def __init__(self, store, images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]):
        self.store = store
        self.images = images
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, g: int) -> ReplayBatch:
        record = self.store.record(int(g))
        images = augment.replay(self.images, record, self.size, self.mean, self.std)
        return ReplayBatch(images, torch.from_numpy(record.logits), int(g))


def torch_loader(dataset: RecordDataset, sampler: PlanSampler, workers: int, pin_memory: bool = False) -> DataLoader:
    """One whole record per item (``batch_size=None``), persistent workers when there are any."""
    return DataLoader(
        dataset, batch_size=None, sampler=sampler, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
    )


class DaliLoader:
    """Iterates ``ReplayBatch`` for the sampler's current epoch through a DALI pipeline.

    The external source is stateless, as DALI asks: batch k of DALI epoch e is record
    ``sampler.records(first_epoch + e)[k]``. DALI prefetches across an epoch boundary when the
    iterator is reset, which is harmless because the plan is a pure function of the epoch. If
    the sampler's epoch is not the next one DALI expects (resume, a jump), the pipeline is rebuilt.
    """

    OUTPUTS = ("images", "logits", "record")

    def __init__(self, store, images: torch.Tensor, sampler: PlanSampler, size: int,
                 mean: Sequence[float], std: Sequence[float], device: torch.device, threads: int = 2):
        try:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
        except ImportError as error:
            raise UserError(f"the DALI loader needs nvidia-dali ({error}); install it or pass --loader torch") from None
        self.store, self.sampler = store, sampler
        # The bank's own [N, H, W, C] memory, not a copy; each batch below is gathered into a new array.
        self.images_hwc = images.permute(0, 2, 3, 1).cpu().numpy()
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.device, self.threads = torch.device(device), threads
        self.batch_size = store.meta["batch_size"]
        self.has_cutout, self.has_mix = store.meta["flip"] == "cutout", store.meta["mix"] == "cutmix"
        self._iterator = None
        self._next_epoch, self._exhausted = None, False
        self._gatherer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-gather")
        self._ahead: dict[tuple[int, int], Future] = {}

    def _batch(self, info) -> tuple[np.ndarray, ...]:
        """The external-source inputs of DALI batch ``info`` (a ``BatchInfo``); StopIteration past the end.

        DALI calls this in the training thread; the gather from the bank runs in a helper thread one
        batch ahead, so the training thread only collects it."""
        epoch, iteration = self._first_epoch + info.epoch_idx, info.iteration
        ahead = self._ahead.pop((epoch, iteration), None)
        inputs = ahead.result() if ahead is not None else self._gather(epoch, iteration)
        if iteration + 1 < len(self.sampler.records(epoch)):
            self._ahead[(epoch, iteration + 1)] = self._gatherer.submit(self._gather, epoch, iteration + 1)
        return inputs

    def _gather(self, epoch: int, iteration: int) -> tuple[np.ndarray, ...]:
        ids = self.sampler.records(epoch)
        if iteration >= len(ids):
            raise StopIteration
        g = ids[iteration]
        record = self.store.record(g)
        n = len(record.img_idx)
        crop = np.asarray(record.crop, dtype=np.int32)
        inputs = [
            np.ascontiguousarray(self.images_hwc[np.asarray(record.img_idx, dtype=np.int64)]),
            np.ascontiguousarray(crop[:, :2]),
            np.ascontiguousarray(crop[:, 2:]),
            np.asarray(record.flip, dtype=np.int32),
            np.ascontiguousarray(record.logits, dtype=np.float16),
            np.full((n,), g, dtype=np.int64),
        ]
        if self.has_cutout:
            y1, y2, x1, x2 = np.asarray(record.cutout.box, dtype=np.float32).T
            inputs += [
                np.stack([y1, x1], 1), np.stack([y2 - y1, x2 - x1], 1),
                np.asarray(record.cutout.fill).astype(np.float32) / np.float32(255),
            ]
        if self.has_mix:
            y1, y2, x1, x2 = np.asarray(record.mix_box, dtype=np.int64).tolist()
            anchors = np.array([[0, 0], [y1, x1]], dtype=np.int32)
            shapes = np.array([[self.size, self.size], [y2 - y1, x2 - x1]], dtype=np.int32)
            sources = np.stack([np.arange(n), np.asarray(record.mix_perm, dtype=np.int64)], 1).astype(np.int32)
            inputs += [sources, np.broadcast_to(anchors, (n, 2, 2)).copy(), np.broadcast_to(shapes, (n, 2, 2)).copy()]
        return tuple(inputs)

    def _build(self, first_epoch: int):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device.type == "cuda"
        self._first_epoch = first_epoch
        for pending in self._ahead.values():
            pending.cancel()  # gathers for the old pipeline's numbering; a running one just finishes unread
        self._ahead.clear()
        dtypes = [types.UINT8, types.INT32, types.INT32, types.INT32, types.FLOAT16, types.INT64]
        ndims = [3, 1, 1, 0, 1, 0]
        if self.has_cutout:
            dtypes, ndims = dtypes + [types.FLOAT] * 3, ndims + [1, 1, 1]
        if self.has_mix:
            dtypes, ndims = dtypes + [types.INT32] * 3, ndims + [1, 2, 2]

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads,
                      device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=2)
        def replay_pipeline():
            inputs = fn.external_source(source=self._batch, num_outputs=len(dtypes), batch=True, batch_info=True,
                                        dtype=dtypes, ndim=ndims, layout=["HWC"])
            images, anchor, shape, flip, logits, record = inputs[:6]
            rest = list(inputs[6:])
            if gpu:
                images, logits = images.gpu(), logits.gpu()
            x = fn.slice(images, anchor, shape, axis_names="HW")  # slicing uint8 copies 4x fewer bytes
            x = fn.cast(x, dtype=types.FLOAT) / 255.0
            x = fn.resize(x, size=[self.size, self.size], interp_type=types.INTERP_LINEAR,
                          antialias=False, dtype=types.FLOAT)
            x = fn.flip(x, horizontal=flip)
            if self.has_cutout:
                cut_anchor, cut_shape, fill = rest[:3]
                rest = rest[3:]
                x = fn.erase(x, anchor=cut_anchor, shape=cut_shape, axis_names="HW", fill_value=fill)
            if self.has_mix:
                sources, anchors, shapes = rest
                x = fn.multi_paste(x, in_ids=sources, in_anchors=anchors, shapes=shapes, out_anchors=anchors)
            mean = types.Constant(np.asarray(self.mean, dtype=np.float32))
            std = types.Constant(np.asarray(self.std, dtype=np.float32))
            return (x - mean) / std, logits, record

        pipeline = replay_pipeline()
        pipeline.build()
        return DALIGenericIterator([pipeline], list(self.OUTPUTS), auto_reset=False)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[ReplayBatch]:
        epoch = self.sampler.epoch
        if self._iterator is None or epoch != self._next_epoch or not self._exhausted:
            self._iterator = self._build(epoch)
        else:
            self._iterator.reset()
        self._next_epoch, self._exhausted = epoch + 1, False
        for outputs in self._iterator:
            out = outputs[0]
            # HWC out of DALI, seen as NCHW: a channels_last view, the layout the GPU student uses.
            yield ReplayBatch(out["images"].permute(0, 3, 1, 2), out["logits"], int(out["record"][0]))
        self._exhausted = True


def dali_available() -> bool:
    """nvidia-dali is a dependency of the default install, but lpld runs without it (the torch replay)."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def resolve_loader(kind: str, device: torch.device) -> str:
    """``auto`` means DALI on a GPU and torch on the CPU (recipe.train.loader); on a GPU without
    nvidia-dali installed it says so in one line and replays with torch."""
    if kind == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        if dali_available():
            return "dali"
        if distributed.is_main():
            print("train: nvidia-dali is not installed, so --loader auto replays with torch on the GPU "
                  "(pip install nvidia-dali-cuda130 for the DALI loader)", file=sys.stderr)
        return "torch"
    if kind not in ("dali", "torch"):
        raise UserError(f"unknown loader {kind!r}; use auto, dali or torch")
    return kind


def make_loader(kind: str, store, images: torch.Tensor, sampler: PlanSampler, size: int,
                mean: Sequence[float], std: Sequence[float], device: torch.device, workers: int):
    """The replay loader for ``kind`` ("auto", "dali" or "torch"); both yield ``ReplayBatch``."""
    kind = resolve_loader(kind, device)
    if kind == "dali":
        return DaliLoader(store, images, sampler, size, mean, std, device, threads=max(1, workers))
    dataset = RecordDataset(store, images, size, mean, std)
    return torch_loader(dataset, sampler, workers, pin_memory=torch.device(device).type == "cuda")
