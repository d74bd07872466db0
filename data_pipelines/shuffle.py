"""Window shuffle: fill a window of elements, emit it in a seeded random order, repeat.

grain's WindowShuffleIterDataset does the same but draws each position with `index_shuffle` (about 0.6 ms per
element on this CPU, a bottleneck at thousands of samples/s); this one permutes with numpy. The state is the
parent's state at the window start plus the position in the window, so a restore re-reads one window.
"""

from __future__ import annotations

import copy

import grain
import numpy as np


class _WindowShuffleIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = window_size, seed
        self._window_index, self._position = 0, 0
        self._window: list = []
        self._window_start_state: dict | None = None  # read lazily: it opens the parent's first shards

    def _fill(self) -> None:
        self._window_start_state = self._parent.get_state()
        window = []
        for _ in range(self._window_size):
            try:
                window.append(next(self._parent))
            except StopIteration:
                break
        order = np.random.default_rng([self._seed, self._window_index]).permutation(len(window))
        self._window = [window[i] for i in order]
        self._position = 0

    def __next__(self):
        if self._position >= len(self._window):
            if self._window:
                self._window_index += 1
            self._fill()
            if not self._window:
                raise StopIteration
        element = self._window[self._position]
        self._window[self._position] = None  # drop the reference early: windows can hold large samples
        self._position += 1
        return element

    def get_state(self) -> dict:
        if self._window_start_state is None:
            self._window_start_state = self._parent.get_state()
        return {"parent": copy.deepcopy(self._window_start_state), "window_index": self._window_index,
                "position": self._position}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._window_index = state["window_index"]
        self._fill()
        self._position = state["position"]


class WindowShuffleIterDataset(grain.IterDataset):
    """Elements shuffled within consecutive windows of `window_size`, reseeded per window from `seed`."""

    def __init__(self, parent: grain.IterDataset, window_size: int, seed: int):
        super().__init__(parent)
        self._window_size, self._seed = window_size, seed

    def __iter__(self) -> _WindowShuffleIterator:
        return _WindowShuffleIterator(self._parent.__iter__(), self._window_size, self._seed)
