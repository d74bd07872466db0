"""The exported tokenizer files, loaded by transformers.AutoTokenizer, give exactly data_pipelines.tokenizer's ids."""

import io

import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from data_pipelines import synthetic
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from vlm_jax.hf.tokenizer_files import write_tokenizer_files

MAX_LEN = 16
HARD_TEXTS = [
    "A Large RED Circle", "a photo of a blue square", "Punctuation!? commas, dots. (brackets) [x] {y} 'q' \"dq\"",
    "digits 0123456789 and 3.14159", "  leading and trailing  ", "multiple     spaces", "tabs\tand\nnew\r\nlines",
    " \t\n mixed whitespace \n\t ", "Привет, мир", "日本語のテキスト", "مرحبا بالعالم", "emoji 🎉🎉 here 👍🏽",
    "ＦＵＬＬ－ｗｉｄｔｈ　１２３ ｶﾀｶﾅ", "ligature ﬁ, roman Ⅻ, x²", "ΟΔΟΣ ΣΑΣ Σ", "İstanbul ẞ", "e\u0301 combining",
    "nbsp\u00a0here", "zero\u200bwidth", "▁literal escape ▁", "", "   ", "red " * 40, "a" * 100,
]


def captions(count: int = 300) -> list[str]:
    rng = np.random.default_rng(0)
    extra = ["Digits 0123456789, 3.14!", "Punctuation? yes: (a) [b] 'c' \"d\";", "Mixed CASE Text"]
    return [synthetic.make_example(rng, i % 24, 16)[1] for i in range(count)] + extra * 5


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    train_tokenizer(captions(), str(path), vocab_size=120)
    return str(path)


def assert_same_ids(model_path, out_dir, *, add_bos, add_eos=True, lower=True, texts=HARD_TEXTS):
    ours = Tokenizer(model_path)
    write_tokenizer_files(model_path, out_dir, max_len=MAX_LEN, add_bos=add_bos, add_eos=add_eos, lower=lower)
    tok = AutoTokenizer.from_pretrained(out_dir)
    expected = ours.encode(texts, MAX_LEN, add_eos=add_eos, add_bos=add_bos, lower=lower)
    padded = tok(texts, padding="max_length", truncation=True)
    for text, got, want in zip(texts, padded["input_ids"], expected):
        assert got == want.tolist(), text
    np.testing.assert_array_equal(np.array(padded["attention_mask"]), expected != ours.pad_id)
    for text, got, want in zip(texts, tok(texts)["input_ids"], expected):  # the plain call: unpadded, same ids
        if len(ours.ids(text, lower)) + add_bos + add_eos <= MAX_LEN:
            assert got == want[:len(got)].tolist() and (want[len(got):] == ours.pad_id).all(), text
    return tok, ours


@pytest.mark.parametrize("add_bos", [False, True])
def test_hf_tokenizer_gives_our_ids(spm_model, tmp_path, add_bos):
    tok, ours = assert_same_ids(spm_model, tmp_path, add_bos=add_bos)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    assert tok.model_max_length == MAX_LEN and tok.padding_side == "right"
    assert 2 in ours.encode(["Привет"], MAX_LEN)  # non-Latin text is outside the tiny vocabulary
    long = tok(["red " * 40], padding="max_length", truncation=True)["input_ids"][0]
    assert len(long) == MAX_LEN and long[-1] == 1  # truncated, EOS kept last
    ids = ours.encode(["a photo of a blue square"], MAX_LEN, add_bos=add_bos)[0]
    assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "a photo of a blue square"


def test_cased_model_without_eos_and_image_token(tmp_path):
    model = str(tmp_path / "cased.model")
    train_tokenizer(captions(), model, vocab_size=120, lower=False)
    assert_same_ids(model, tmp_path / "noeos", add_bos=True, add_eos=False, lower=False)
    assert_same_ids(model, tmp_path / "lowered", add_bos=False, lower=True)
    # PaliGemma's processor writes "<image>" * n + bos_token + prompt itself: no BOS or EOS from the template
    write_tokenizer_files(model, tmp_path / "pg", max_len=MAX_LEN, add_bos=False, add_eos=False, lower=False,
                          extra_special_tokens={"image_token": "<image>"})
    tok, ours = AutoTokenizer.from_pretrained(tmp_path / "pg"), Tokenizer(model)
    assert tok.image_token == "<image>" and tok.image_token_id == ours.vocab_size
    image_ids = [tok.image_token_id] * 2
    assert tok("<image><image><s>Red box")["input_ids"] == image_ids + [3] + ours.ids("Red box", lower=False)


def test_byte_fallback_model(tmp_path):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions()), model_writer=model, vocab_size=400, model_type="unigram", pad_id=0,
        eos_id=1, unk_id=2, bos_id=3, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "bytes.model").write_bytes(model.getvalue())
    tok, ours = assert_same_ids(str(tmp_path / "bytes.model"), tmp_path / "out", add_bos=True)
    assert 2 not in ours.encode(["Привет 🎉"], MAX_LEN)  # bytes, not unknown
    ids = ours.encode(["мир 🎉"], MAX_LEN)[0]
    assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "мир 🎉"


def test_bad_model_paths_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^tokenizer model not found: {tmp_path}/missing.model$"):
        write_tokenizer_files(str(tmp_path / "missing.model"), tmp_path / "out", max_len=MAX_LEN)
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=f"^tokenizer model unreadable: {tmp_path}/bad.model") as error:
        write_tokenizer_files(str(tmp_path / "bad.model"), tmp_path / "out", max_len=MAX_LEN)
    assert "\n" not in str(error.value)
