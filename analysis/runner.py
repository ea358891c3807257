"""The one measuring loop: quantization state -> logits over a fixed image set ->
:class:`~analysis.metrics.OutputStats` against FP32.

Every analysis measures through :class:`Runner` (sensitivity, planner) or
:func:`stream` (evaluation over images decoded batch by batch), so they all see
the same forward, the same reference logits and the same metrics. A measurement
that only changes sites from block k on restarts from the hidden states cached
at block k (:class:`BoundaryCache`): the blocks before it are not re-run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from quant.config import QuantConfig
from quant.model import QuantModel
from quant.sites import Site

from .metrics import OutputStats

State = dict  # QuantModel.snapshot()
# images between two looks of a measurement that may stop early (Runner.measure(stop=...))
LOOK_IMAGES = 64


class SwitchableModel(Protocol):
    """What :func:`stream` and :func:`analysis.evaluate.evaluate_configs` run: a model
    whose quantization state is prepared once per config and swapped in batch by batch.
    :class:`~quant.model.QuantModel` is one; ``vitq.backends.BackendEval`` serves a
    real-int8 backend through the same interface."""

    sites: list[Site]

    def prepare(self, config: QuantConfig | None) -> Any:
        """The state of ``config`` (None: FP32), an opaque value for :meth:`restore`."""

    def restore(self, state: Any) -> None:
        """Run the next calls under ``state``."""

    def apply(self, config: QuantConfig | None) -> None:
        """Put the model into ``config`` (None: FP32, how evaluation leaves it)."""

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of ``pixels`` under the current state."""


class _Memmap:
    """A float32 array on disk filled chunk by chunk (memory stays bounded)."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    def write(self, start: int, values: torch.Tensor) -> None:
        self.array[start:start + len(values)] = values.cpu().numpy()

    def read(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[start:stop]))


class BoundaryCache:
    """The hidden states entering every block (and the head) of a fixed image set
    under one background state, on disk."""

    def __init__(self, qmodel: QuantModel, batches: list[torch.Tensor], folder: Path) -> None:
        self.qmodel, self.batches = qmodel, batches
        self.bounds: list[_Memmap] = []
        n = sum(len(b) for b in batches)
        folder.mkdir(parents=True, exist_ok=True)
        start = 0
        with torch.inference_mode():
            for pixels in batches:
                h = qmodel.embed(pixels)
                for k in range(qmodel.num_blocks + 1):
                    if len(self.bounds) <= k:
                        self.bounds.append(_Memmap(folder / f"bound_{k}.npy", (n, *h.shape[1:])))
                    self.bounds[k].write(start, h)
                    if k < qmodel.num_blocks:
                        h = qmodel.run_blocks(h, k, k + 1)
                start += len(pixels)

    def hidden(self, block: int, batch: int) -> torch.Tensor:
        start = sum(len(b) for b in self.batches[:batch])
        return self.bounds[block].read(start, start + len(self.batches[batch]))


class Runner:
    """A calibrated QuantModel and an image set held in memory (list of pixel
    batches, labels): FP32 reference logits once, then any state's logits/metrics."""

    def __init__(self, qmodel: QuantModel, batches: list[torch.Tensor], labels: torch.Tensor | None = None) -> None:
        self.qmodel, self.batches, self.labels = qmodel, list(batches), labels
        self.fp32_state = qmodel.prepare(None)
        self.reference = self.logits(self.fp32_state)

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches)

    def state(self, config: QuantConfig | None) -> State:
        """The model's quantizer state for ``config`` (None: FP32); the model is left in it."""
        return self.qmodel.prepare(config)

    def logits(self, state: State, start_block: int = -1, cache: BoundaryCache | None = None) -> torch.Tensor:
        """Logits (float64) of every image under ``state``; with ``cache`` (built under a
        background state that differs from ``state`` only from ``start_block`` on) the
        blocks before ``start_block`` are read from the cache instead of re-run."""
        self.qmodel.restore(state)
        return torch.cat([self._batch_logits(i, start_block, cache) for i in range(len(self.batches))])

    def measure(self, state: State | QuantConfig | None, start_block: int = -1,
                cache: BoundaryCache | None = None, *, stop: Callable[[OutputStats], bool] | None = None,
                done: OutputStats | None = None, look: int = LOOK_IMAGES) -> OutputStats:
        """Per-image metrics of ``state`` (or a config) against FP32 (FP32 itself: no pass).
        ``stop``: asked with the metrics so far after every ``look`` images (never after the
        last batch); when it answers True the measurement ends there and covers the first
        images only. ``done``: the metrics of the first images, measured before (a stopped
        measurement taken up again); the batches they cover are not re-run."""
        if state is None or state is self.fp32_state:
            return OutputStats.of(self.reference, self.reference, self.labels)
        if isinstance(state, QuantConfig):
            state = self.state(state)
        stats = OutputStats() if done is None else OutputStats(done.values)
        starts = np.cumsum([0, *(len(b) for b in self.batches)])
        first = int(np.searchsorted(starts, len(stats)))
        if first >= len(starts) or starts[first] != len(stats):
            raise ValueError(f"{len(stats)} images measured before is not a whole number of batches")
        self.qmodel.restore(state)
        next_look = len(stats) + look
        for i in range(first, len(self.batches)):
            a, b = int(starts[i]), int(starts[i + 1])
            stats.update(self._batch_logits(i, start_block, cache), self.reference[a:b],
                         None if self.labels is None else self.labels[a:b])
            if stop is not None and b < len(self) and b >= next_look:
                if stop(stats):
                    break
                next_look = b + look
        return stats

    @torch.inference_mode()
    def _batch_logits(self, i: int, start_block: int, cache: BoundaryCache | None) -> torch.Tensor:
        q = self.qmodel
        if cache is None or start_block < 0:
            h, start = q.embed(self.batches[i]), 0
        else:
            h, start = cache.hidden(start_block, i).to(q.device, non_blocking=True), start_block
        return q.head(q.run_blocks(h, start)).double()

    def boundaries(self, state: State, folder: Path) -> BoundaryCache:
        self.qmodel.restore(state)
        return BoundaryCache(self.qmodel, self.batches, folder)


def stream(model: SwitchableModel, states: dict[str, Any],
           batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[int]]]
           ) -> Iterator[tuple[list[int], dict[str, OutputStats]]]:
    """Images decoded batch by batch (too many to hold): every state (``model.prepare``'s)
    on each batch, the first state being the FP32 reference."""
    for pixels, labels, idx in batches:
        reference, out = None, {}
        for name, state in states.items():
            model.restore(state)
            logits = model(pixels).double()
            reference = logits if reference is None else reference
            out[name] = OutputStats.of(logits, reference, labels)
        yield list(idx), out


SCRATCH_PREFIX = "vitq-sens-"


@contextlib.contextmanager
def scratch(out_dir: Path) -> Iterator[Path]:
    """A scratch folder for boundary caches inside ``out_dir``, removed on exit, named
    ``vitq-sens-<host>-<pid>-<random>``. Those left by killed runs of this host (their
    process is gone) are removed first; another host's are left alone, since several
    hosts may share one output folder and a PID says nothing about another host."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    host = _host()
    for folder in out_dir.glob(f"{SCRATCH_PREFIX}*"):
        parts = folder.name[len(SCRATCH_PREFIX):].rsplit("-", 2)  # the random tail has no "-"
        if len(parts) < 3:
            warnings.warn(f"scratch folder {folder} does not name its host (an older vitq made it): left in "
                          "place; remove it when no run uses it", stacklevel=3)
        elif parts[0] == host and not (parts[1].isdigit() and _alive(int(parts[1]))):
            shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{host}-{os.getpid()}-", dir=out_dir) as tmp:
        yield Path(tmp)


def _host() -> str:
    """This host's name as it appears in scratch folder names (characters other than
    letters, digits, ``.``, ``_`` and ``-`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
