"""Fixed-length rows of VLM examples (vlm_examples.py), one example per row (padded) or several (packed).

An example is {"text": int32 [n] (BOS..EOS), "prefix_len": int, "skipped": counters, ["image": uint8 [H, W, 3]]}.
Its sequence is [image tokens][text]; a row of length S holding examples 1, 2, ... in order has (R = rows):
    images        uint8 [I, H, W, 3]  the row's images in order; unused slots zero
    tokens        int32 [S]  text ids at text positions; 0 at image positions and padding
    image_slot    int32 [S]  at an image token: image i, patch p -> i * image_tokens + p; -1 elsewhere
    segment_ids   int32 [S]  1, 2, ... per example; 0 on padding
    positions     int32 [S]  position within the example (its first token is 0); 0 on padding
    prefix_end    int32 [S]  the row position one past the example's bidirectional part (image tokens, BOS,
                             prefix, separator); 0 on padding
    targets       int32 [S]  the token at t + 1 when it belongs to the same example, else 0
    loss_weights  float32 [S]  1 / n_e where the target is one of example e's n_e supervised ids (suffix and
                             EOS), else 0: sum(loss_weights * nll) / sum(loss_weights) is the per-example mean,
                             then the batch mean, and sum(loss_weights) the number of examples
    skipped       the examples' counter vectors summed (preprocess.py)

Packing is greedy in arrival order with one example of lookahead: examples join the row until the next one does
not fit (tokens > S or images > I), which then opens the next row. Every example fits an empty row (the config
check makes S >= image_tokens + text_len), so none is cut or dropped here. The iterator state is the parent's
state before the example carried over to the next row (no arrays), so a restore re-reads that one example.
"""

from __future__ import annotations

import copy
import dataclasses

import grain
import numpy as np

from data_pipelines.preprocess import SKIPPED_KEY
from data_pipelines.samples import DataError
from data_pipelines.vlm_examples import VlmOptions


@dataclasses.dataclass(frozen=True)
class RowLayout:
    length: int                          # S: tokens per row
    images: int                          # I: image slots per row
    image_tokens: int                    # tokens per image
    image_shape: tuple[int, int, int]    # (H, W, 3)
    max_examples: int | None = None      # 1: one example per row (unpacked)


def row_layout(options: VlmOptions, image_size: int) -> RowLayout:
    return RowLayout(options.row_length, options.images_per_row, options.image_tokens, (image_size, image_size, 3),
                     None if options.pack else 1)


def example_length(example: dict, layout: RowLayout) -> int:
    return layout.image_tokens * ("image" in example) + len(example["text"])


def _check_image(image: np.ndarray, layout: RowLayout) -> None:
    if image.shape != layout.image_shape or image.dtype != np.uint8:
        raise DataError(f"the image preprocessing gives {image.dtype} images of shape {image.shape}; VLM rows "
                        f"need uint8 {layout.image_shape} (data.pp_train: resize to the model's size, no value_range)")


def make_row(examples: list[dict], layout: RowLayout) -> dict[str, np.ndarray]:
    """One row of `examples` (which must fit) in the format of the module docstring."""
    length, tokens_per_image = layout.length, layout.image_tokens
    row = {"images": np.zeros((layout.images, *layout.image_shape), np.uint8),
           "tokens": np.zeros(length, np.int32), "image_slot": np.full(length, -1, np.int32),
           **{key: np.zeros(length, np.int32) for key in ("segment_ids", "positions", "prefix_end", "targets")},
           "loss_weights": np.zeros(length, np.float32),
           SKIPPED_KEY: np.sum([example[SKIPPED_KEY] for example in examples], axis=0, dtype=np.int32)}
    start = image = 0
    for segment, example in enumerate(examples, 1):
        text, prefix_len = example["text"], example["prefix_len"]
        text_start = start + tokens_per_image * ("image" in example)
        end = text_start + len(text)
        if "image" in example:
            _check_image(example["image"], layout)
            row["images"][image] = example["image"]
            row["image_slot"][start:text_start] = image * tokens_per_image + np.arange(tokens_per_image)
            image += 1
        row["tokens"][text_start:end] = text
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(end - start)
        row["prefix_end"][start:end] = text_start + prefix_len
        row["targets"][start:end - 1] = row["tokens"][start + 1:end]
        row["loss_weights"][text_start + prefix_len - 1:end - 1] = 1.0 / (len(text) - prefix_len)
        start = end
    return row


class _RowIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, layout: RowLayout):
        super().__init__(parent)
        self._layout = layout
        self._next: dict | None = None   # an example pulled but not yet placed: it opens the next row
        self._state_before_next = None   # the parent's state before it was pulled

    def _peek(self) -> dict:
        if self._next is None:
            self._state_before_next = copy.deepcopy(self._parent.get_state())
            self._next = next(self._parent)
        return self._next

    def _fits(self, examples: list[dict], tokens: int, images: int, example: dict) -> bool:
        layout = self._layout
        return (tokens + example_length(example, layout) <= layout.length
                and images + ("image" in example) <= layout.images
                and (layout.max_examples is None or len(examples) < layout.max_examples))

    def __next__(self) -> dict[str, np.ndarray]:
        examples, tokens, images = [], 0, 0
        while True:
            try:
                example = self._peek()
            except StopIteration:
                if examples:
                    break
                raise
            if examples and not self._fits(examples, tokens, images, example):
                break
            examples.append(example)
            tokens, images = tokens + example_length(example, self._layout), images + ("image" in example)
            self._next = None
            if len(examples) == self._layout.max_examples:
                break
        return make_row(examples, self._layout)

    def get_state(self) -> dict:
        return {"parent": self._state_before_next if self._next is not None else self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._next = self._state_before_next = None


class RowIterDataset(grain.IterDataset):
    """Examples -> rows of `layout` (packed unless layout.max_examples is 1)."""

    def __init__(self, parent: grain.IterDataset, layout: RowLayout):
        super().__init__(parent)
        self._layout = layout

    def __iter__(self) -> _RowIterator:
        return _RowIterator(self._parent.__iter__(), layout=self._layout)
