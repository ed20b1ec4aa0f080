"""Where each stage reads and writes its artifacts inside one run directory.

Stages take a ``WorkDir`` so that ``lpld run`` and the single-stage commands agree on paths, and
so that a rerun finds (and resumes from) whatever an earlier run left.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkDir:
    root: Path

    @classmethod
    def for_recipe(cls, workdir: str | None, recipe_name: str) -> "WorkDir":
        return cls(Path(workdir) if workdir else Path("runs") / recipe_name)

    @property
    def teacher(self) -> Path:
        return self.root / "teacher.safetensors"

    @property
    def stats(self) -> Path:
        return self.root / "class_bn_stats.safetensors"

    @property
    def distilled(self) -> Path:
        return self.root / "distilled"

    @property
    def listings(self) -> Path:
        """Cached listings of the real data's folders (``data.list_images``), one file per split."""
        return self.root / "listings"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    def student(self, name: str) -> Path:
        return self.root / "students" / name

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def analysis(self) -> Path:
        """Analysis results (``lpld analyze``), one JSON per analysed set."""
        return self.root / "analysis"

    def diversity(self, name: str) -> Path:
        return self.analysis / f"diversity-{name}.json"

    @property
    def report(self) -> Path:
        return self.root / "report"
