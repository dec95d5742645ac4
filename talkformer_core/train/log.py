"""The training log: CSV on rank 0 (cut back to the resumed step), and TensorBoard if importable."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np


class Logger:
    """CSV (always, rank 0) and TensorBoard (if importable)."""

    def __init__(self, out: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.csv_path = out / "log.csv"
        self.fields: list[str] | None = None
        self.tb = None
        if not enabled:
            return
        if resume_step > 0 and self.csv_path.exists():  # drop rows past the resumed step
            with open(self.csv_path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
            if rows:
                self.fields = list(rows[0].keys())
                with open(self.csv_path, "w", newline="") as f:
                    w = csv.DictWriter(f, self.fields)
                    w.writeheader()
                    w.writerows(rows)
        elif self.csv_path.exists():
            self.csv_path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except Exception as e:  # tensorboard missing: CSV only
            warnings.warn(f"TensorBoard logging off ({e})", stacklevel=2)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: f"{v:.9g}" if isinstance(v, float) else v for k, v in values.items()}}
        new = self.fields is None
        if new:
            self.fields = list(row.keys())
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def image(self, step: int, name: str, img: np.ndarray) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image(name, img, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
