"""SentencePiece tokenizers: train one from captions, load any `.model`, encode to fixed-length ids.

    python -m data_pipelines.tokenizer train --shards 'DIR/train/*.tar' --vocab-size 1000 --out DIR/spm.model
    (add --no-lower to keep the captions' case)

Ids of the models trained here: 0 pad, 1 end of sequence (EOS), 2 unknown, 3 begin of sequence (BOS).
Models trained before BOS was reserved have no BOS (ids 0 pad, 1 EOS, 2 unknown).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from data_pipelines.samples import DataError
from data_pipelines.webdataset import expand_shards, read_shard


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int, lower: bool = True) -> None:
    """Trains a unigram SentencePiece model on `texts` (lower-cased unless lower=False) and writes it to
    `model_path`. Ids 0-3 are pad, EOS, unknown and BOS."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t.lower() if lower else t for t in texts), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=3, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2)
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    with open(model_path, "wb") as f:
        f.write(model.getvalue())


class Tokenizer:
    """Encodes to fixed-length ids: optionally lower-cases, prepends BOS, appends EOS; truncates (keeping EOS
    last) and pads to `max_len`.

    Picklable: worker processes reload the model from its path.
    """

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._processor = self._load(model_path)

    @staticmethod
    def _load(path: str) -> spm.SentencePieceProcessor:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as e:
            raise FileNotFoundError(f"tokenizer model unreadable: {path} ({e})") from e
        return processor

    def __getstate__(self):
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def bos_id(self) -> int:
        """-1 for a model without a BOS piece."""
        return self._processor.bos_id()

    def require_bos(self) -> int:
        """The BOS id; DataError (one line) for a model without one."""
        if self.bos_id < 0:
            raise DataError(f"tokenizer {self.model_path} has no BOS piece: retrain it with "
                            "`python -m data_pipelines.tokenizer train` (which reserves id 3 for BOS)")
        return self.bos_id

    def ids(self, text: str, lower: bool = True) -> list[int]:
        """The ids of one text, without BOS, EOS or padding; `lower` lower-cases it first."""
        return self._processor.EncodeAsIds(text.lower() if lower else text)

    def encode(self, texts: Sequence[str], max_len: int, add_eos: bool = True, add_bos: bool = False,
               lower: bool = True) -> np.ndarray:
        """int32 [len(texts), max_len]: [BOS] ids [EOS] pad...; with `add_eos` the last kept id is EOS even
        after truncation. `lower` lower-cases the text first (as the models trained here saw it)."""
        out = np.full((len(texts), max_len), self.pad_id, np.int32)
        for row, text in enumerate(texts):  # One string per call: the list form starts threads (7x slower).
            out[row] = self.encode_one(text, max_len, add_eos, add_bos, lower)[0]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The text of one row of ids, up to its first EOS; padding, BOS and ids outside the vocabulary are
        dropped."""
        kept = []
        for token in (int(t) for t in ids):
            if token == self.eos_id:
                break
            if token not in (self.pad_id, self.bos_id) and 0 <= token < self.vocab_size:
                kept.append(token)
        return self._processor.DecodeIds(kept)

    def encode_one(self, text: str, max_len: int, add_eos: bool = True, add_bos: bool = False,
                   lower: bool = True) -> tuple[np.ndarray, bool]:
        """int32 [max_len] ids of one text as `encode` makes them, and whether the text's ids were truncated."""
        prefix = [self.require_bos()] if add_bos else []
        suffix = [self.eos_id] if add_eos else []
        room = max(max_len - len(prefix) - len(suffix), 0)
        text_ids = self.ids(text, lower)
        ids = (prefix + text_ids[:room] + suffix)[:max_len]
        out = np.full(max_len, self.pad_id, np.int32)
        out[:len(ids)] = ids
        return out, len(text_ids) > room


def captions_from_shards(spec: str) -> Iterable[str]:
    for path in expand_shards(spec):
        for sample in read_shard(path):
            if "caption" in sample:
                yield sample["caption"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece model on the captions of shards")
    train.add_argument("--shards", required=True)
    train.add_argument("--vocab-size", type=int, default=1000)
    train.add_argument("--out", required=True)
    train.add_argument("--no-lower", dest="lower", action="store_false",
                       help="keep the captions' case (default: lower-case them, as the contrastive demo does)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train_tokenizer(captions_from_shards(args.shards), args.out, args.vocab_size, lower=args.lower)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({Tokenizer(args.out).vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
