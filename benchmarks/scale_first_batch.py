"""One rank's way from process start to its first training batch, as ``lpld train`` goes there.

Run by ``benchmarks/test_bench_scale.py`` (alone, or under torchrun for 2 ranks) on synthetic
ImageNet-shaped data: open the distilled images through their bank, open the label store (rank 0
verifies, the others wait), build the student and the replay loader, take one batch. The
validation set is left out: there is no real ImageNet on this machine. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

START = time.perf_counter()

import torch  # noqa: E402  (the clock starts before the imports, as a process's does)

from lpld import bank, distributed, models, replay, train  # noqa: E402
from lpld.labels import LabelStore  # noqa: E402
from lpld.recipes import get_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--distilled", required=True)
    parser.add_argument("--labels", required=True)
    args = parser.parse_args()
    phases = {"imports": time.perf_counter() - START}
    rank, world = distributed.init("cpu")  # the scale check measures the host side
    recipe = get_recipe("imagenet1k")
    mark = time.perf_counter()
    distilled = bank.open(args.distilled, recipe.data.channels)
    phases["bank_open"] = time.perf_counter() - mark
    mark = time.perf_counter()
    store = LabelStore.open(args.labels, expect_images=len(distilled.images), expect_classes=recipe.data.num_classes,
                            verify_checksums=distributed.is_main())
    distributed.barrier()
    phases["store_open"] = time.perf_counter() - mark
    mark = time.perf_counter()
    model = models.use_ghost_batch_norm(models.build_model(recipe.model.arch, recipe.data.num_classes, 3, recipe.model.stem),
                                        recipe.train.bn_batch)
    phases["student"] = time.perf_counter() - mark
    mark = time.perf_counter()
    sampler = replay.PlanSampler(train.training_plan(store, 0))
    batches = replay.make_loader("torch", store, distilled.images, sampler, store.meta["size"], store.meta["mean"],
                                 store.meta["std"], torch.device("cpu"), 0)
    sampler.set_epoch(0)
    batch = next(iter(batches))
    rows = train.rank_rows(len(batch.images), rank, world)
    phases["first_batch"] = time.perf_counter() - mark
    seconds = time.perf_counter() - START
    print(json.dumps({"rank": rank, "world": world, "seconds_to_first_batch": seconds, "phases": phases,
                      "batch": list(batch.images[rows].shape), "parameters": sum(p.numel() for p in model.parameters())}),
          flush=True)
    distributed.barrier()


if __name__ == "__main__":
    main()
