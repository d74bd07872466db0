"""A sentencepiece model as the files `transformers.AutoTokenizer` loads (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`), giving exactly the ids of `data_pipelines.tokenizer.Tokenizer.encode`.

The tokenizer.json reproduces sentencepiece's Unigram encoding: the model's own normalizer (its precompiled
charsmap, e.g. nmt_nfkc, then extra-space removal, "▁" escaping and the dummy prefix), the pieces and scores, the
unknown id and byte fallback, preceded by a Lowercase normalizer when our models saw lower-cased text (with
Python's final-sigma rule, as `str.lower`), and followed by [BOS] ids [EOS].

The exported models take fixed-length input, so `model_max_length` is the model's text length, padding and
truncation are on the right, and truncation keeps EOS last (the post-processor's tokens are counted first):
`tok(texts, padding="max_length", truncation=True)` equals `Tokenizer.encode(texts, max_len, ...)`. The plain
`tok(texts)` gives the same ids without the padding (the same values at every non-pad position) for texts that
fit; models that read a fixed position (e.g. SigLIP's last token) need `padding="max_length"`, as in transformers.

Not reproduced: text containing the literal strings of the control pieces ("<pad>", "</s>", "<unk>", "<s>") or of
extra special tokens encodes to those tokens' ids in transformers, while sentencepiece encodes them as text.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

# sentencepiece piece types (sentencepiece_model.proto): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, BYTE 6
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4
# Python's str.lower maps a capital sigma that ends a word to "ς" (Unicode Final_Sigma); Lowercase maps to "σ".
_FINAL_SIGMA = Regex(r"(?<=\p{Cased}\p{Case_Ignorable}*)Σ(?!\p{Case_Ignorable}*\p{Cased})")


def read_spm_model(path: str) -> sentencepiece_model_pb2.ModelProto:
    """The parsed sentencepiece model; a one-line error naming the path when it is missing, unreadable or not a
    Unigram model."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # protobuf raises DecodeError and others for bytes that are not a model
        raise ValueError(f"tokenizer model unreadable: {path} ({e})") from None
    if not proto.pieces:
        raise ValueError(f"tokenizer model unreadable: {path} (no pieces)")
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(f"tokenizer model {path} is not a Unigram model: only Unigram models (as "
                         "`python -m data_pipelines.tokenizer train` makes) can be exported")
    return proto


def _normalizer(proto: sentencepiece_model_pb2.ModelProto, lower: bool) -> normalizers.Normalizer:
    """sentencepiece's normalization (normalizer.cc), after our lower-casing."""
    spec = proto.normalizer_spec
    steps = [normalizers.Replace(_FINAL_SIGMA, "ς"), normalizers.Lowercase()] if lower else []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # only spaces: the charsmap has already mapped tabs and newlines
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:  # sentencepiece prefixes "▁" to any non-empty text, even one starting with "▁"
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence(steps)


def build_tokenizer(proto: sentencepiece_model_pb2.ModelProto, *, add_bos: bool, add_eos: bool, lower: bool,
                    extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """The `tokenizers` Tokenizer of a Unigram sentencepiece model: ids [BOS] text [EOS] with sentencepiece's
    text ids; `extra_special_tokens` get the ids after the model's pieces, in order."""
    trainer = proto.trainer_spec
    tokenizer = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=trainer.unk_id,
                                         byte_fallback=trainer.byte_fallback))
    tokenizer.normalizer = _normalizer(proto, lower)
    steps = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if trainer.byte_fallback else [])
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    special = [p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)] + list(extra_special_tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == _USER_DEFINED])
    bos = [(trainer.bos_piece, trainer.bos_id)] if add_bos else []
    eos = [(trainer.eos_piece, trainer.eos_id)] if add_eos else []
    template = " ".join([t for t, _ in bos] + ["$A"] + [t for t, _ in eos])
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=bos + eos)
    return tokenizer


def write_tokenizer_files(spm_model: str, out_dir: str | os.PathLike, *, max_len: int, add_bos: bool = False,
                          add_eos: bool = True, lower: bool = True,
                          model_input_names: Sequence[str] = ("input_ids", "attention_mask"),
                          extra_special_tokens: Mapping[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Writes the transformers tokenizer files of `spm_model` to `out_dir` and returns the tokenizer.

    `max_len`, `add_bos`, `add_eos` and `lower` as the model was trained (`Tokenizer.encode`'s arguments).
    `model_input_names`: what the model takes (["input_ids"] for SigLIP, which has no attention mask).
    `extra_special_tokens`: named tokens added after the model's pieces, in order, e.g. {"image_token": "<image>"}
    for PaliGemma, whose image positions carry id = the sentencepiece vocabulary size (`tok.image_token_id`).
    """
    proto = read_spm_model(spm_model)
    trainer, extra = proto.trainer_spec, dict(extra_special_tokens or {})
    if add_bos and trainer.bos_id < 0:
        raise ValueError(f"tokenizer {spm_model} has no BOS piece: retrain it with "
                         "`python -m data_pipelines.tokenizer train` (which reserves id 3 for BOS)")
    named = {"pad_token": (trainer.pad_piece, trainer.pad_id), "eos_token": (trainer.eos_piece, trainer.eos_id),
             "unk_token": (trainer.unk_piece, trainer.unk_id), "bos_token": (trainer.bos_piece, trainer.bos_id)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(proto, add_bos=add_bos, add_eos=add_eos, lower=lower,
                                         extra_special_tokens=list(extra.values())),
        model_max_length=max_len, padding_side="right", truncation_side="right",
        model_input_names=list(model_input_names), clean_up_tokenization_spaces=False,
        extra_special_tokens=extra or None, **{name: piece for name, (piece, i) in named.items() if i >= 0})
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
