"""The maps that a run's states are compared with, held one image chunk at a time."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import torch
from torch import Tensor

from sanity_cli.rundir import replace_atomically, writing


def image_chunks(n: int, size: int | None) -> list[slice]:
    """The run's n images `size` at a time (all at once when size is None)."""
    size = size or n
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class ReferenceMaps:
    """The maps that states are compared with (step 0's, and those of the states a check
    keeps, `Condition.kept`), chunk by chunk: kept in memory when the images are one chunk, else
    written to run_dir/.reference (removed when done) and read back one chunk at a time."""

    def __init__(self, run_dir: Path, in_memory: bool):
        self.kept: dict[tuple[int, int], dict[str, Tensor]] = {}  # (step, chunk) -> maps
        self.folder = None if in_memory else run_dir / ".reference"
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)  # left by a run that was killed
            with writing(self.folder):
                self.folder.mkdir()

    def __enter__(self) -> ReferenceMaps:
        return self

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def put(self, index: int, maps: dict[str, Tensor], step: int = 0) -> None:
        if self.folder is None:
            self.kept[(step, index)] = maps
        else:
            # Serialized in memory, then written as every other file of the run: a full disk
            # is then one line, not torch's "enforce fail" from inside its writer.
            buffer = io.BytesIO()
            torch.save({name: value.detach().cpu() for name, value in maps.items()}, buffer)
            replace_atomically(self.folder / f"{step}_{index}.pt", buffer.getvalue())

    def get(self, index: int, device: torch.device, step: int = 0) -> dict[str, Tensor]:
        if self.folder is None:
            return self.kept[(step, index)]
        maps = torch.load(self.folder / f"{step}_{index}.pt", weights_only=True)
        return {name: value.to(device) for name, value in maps.items()}
