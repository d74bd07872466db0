"""PaliGemma / Gemma export and import against transformers (CPU torch, float32): a folder written by
`paligemma_export` loads into PaliGemmaForConditionalGeneration with no missing or unexpected key and gives our
logits, image features and greedy answers; scan and non-scan stacks export alike; transformers -> ours ->
transformers is bit-exact; what PaliGemma cannot express is refused in one line."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import vlm_jax.train_state  # noqa: F401  (flax_always_shard_variable False, before any model is built)
from data_pipelines.tokenizer import Tokenizer, train_tokenizer
from vlm_jax.config import ConfigError, base_config
from vlm_jax.decoding import generate
from vlm_jax.hf.gemma_weights import export_flat, gemma_import, gemma_rules
from vlm_jax.hf.load import configured, load_folder
from vlm_jax.hf.paligemma import (canonical_names, paligemma_export, paligemma_generation_config,
                                  paligemma_import)
from vlm_jax.hf.weights import read_safetensors, stack_layers, unstack_layers, write_safetensors
from vlm_jax.kernels.masks import MaskSpec
from vlm_jax.tasks import get_task
from vlm_jax.tasks.towers import gemma_config

VOCAB, IMAGE, PATCH = 64, 16, 8
TOKENS = (IMAGE // PATCH) ** 2
BOS, EOS = 3, 1


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def vlm_config(gemma2: bool = False, scan: bool = False, image=("mu", PATCH, IMAGE), vocab=VOCAB, **lm):
    """A tiny PaliGemma-shaped run: GQA (4 query, 2 key/value heads) with head_dim 24 != width / heads; Gemma 1
    blocks, or Gemma 2 ones (post-norms, softcaps small enough to bite, alternating local layers of window 8)."""
    c = base_config()
    c.task, c.model.scan = "vlm", scan
    size, patch, image_size = image
    c.model.image.variant, c.model.image.image_size, c.model.image.pool = f"{size}/{patch}", image_size, "none"
    if size == "mu":
        c.model.image.depth, c.model.image.num_heads = 2, 4
    c.model.text.vocab_size = vocab
    c.model.lm.size, c.model.lm.max_len = "tiny", 512
    c.model.lm.num_heads, c.model.lm.num_kv_heads, c.model.lm.head_dim = 4, 2, 24
    c.model.lm.qk_norm, c.model.lm.post_norms = False, gemma2
    c.model.lm.rope_base = c.model.lm.rope_base_local = 10_000.0
    c.model.lm.attn_softcap, c.model.lm.final_softcap = (5.0, 3.0) if gemma2 else (0.0, 0.0)
    c.model.lm.window, c.model.lm.layer_pattern = (8, "LG") if gemma2 else (0, "G")
    for key, value in lm.items():
        c.model.lm[key] = value
    c.data.train_shards = c.data.tokenizer = "unused"
    tokens = (image_size // patch) ** 2
    c.data.vlm = {"image_tokens": tokens, "text_len": 16,
                  "tasks": {"caption": {"prefix": "caption", "suffix": "{caption}"}}}
    return c


def build(config, seed=0):
    """Task and model with every parameter perturbed (norm scales and biases are zero- or one-initialised)."""
    task = get_task(config)
    model = task.build_model(nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32),
                        state.to_pure_dict())
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return task, model, pure


def write_folder(path, config, params):
    hf_config, tensors = paligemma_export(params, config)
    write_safetensors(tensors, path)
    for name, content in (("config.json", hf_config), ("generation_config.json", paligemma_generation_config(config))):
        with open(path / name, "w") as f:
            json.dump(content, f)
    return hf_config, tensors


def load_hf(path):
    from transformers import PaliGemmaForConditionalGeneration
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


def prefix_lm_rows(rng, prefix_lens, suffix_len, image_id, image_size=IMAGE, patch=PATCH):
    """Rows [image][BOS prefix ; ][suffix] (no padding): our batch and transformers' inputs (text ids below the
    image token id)."""
    tokens = (image_size // patch) ** 2
    rows = len(prefix_lens)
    text = rng.integers(4, image_id, (rows, max(prefix_lens) + 2 + suffix_len))
    text[:, 0] = BOS
    length = tokens + text.shape[1]
    positions = np.broadcast_to(np.arange(length), (rows, length))
    prefix_end = np.array([[tokens + 2 + p] * length for p in prefix_lens])
    images = rng.uniform(-1, 1, (rows, 1, image_size, image_size, 3)).astype(np.float32)
    ours = {"tokens": np.concatenate([np.zeros((rows, tokens), np.int64), text], 1),
            "image_slot": np.where(positions < tokens, positions, -1), "segment_ids": np.ones((rows, length)),
            "positions": positions, "prefix_end": prefix_end, "images": images}
    hf = {"input_ids": np.where(positions < tokens, image_id, ours["tokens"]),
          "token_type_ids": (positions >= prefix_end).astype(np.int64),
          "pixel_values": images[:, 0].transpose(0, 3, 1, 2)}
    return ({key: jnp.asarray(value, jnp.float32 if key == "images" else jnp.int32) for key, value in ours.items()},
            {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in hf.items()})


def max_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs.detach().numpy())))


def greedy_ours(task, model, images, prompts, steps):
    inputs = {"image": jnp.asarray(images), "prompt": jnp.asarray(prompts, jnp.int32)}
    return np.asarray(generate(lambda x: task.prefill(model, x, steps), lambda c, t: task.extend(model, c, t),
                               inputs, max_new_tokens=steps, eos_id=EOS))


def greedy_hf(hf_model, images, prompts, steps):
    """transformers' greedy answers for left-padded prompts ([pad][image][BOS prompt ;]), padded to `steps`."""
    valid = prompts != 0
    ids = np.concatenate([np.full((len(prompts), TOKENS), hf_model.config.image_token_id), prompts], 1)
    mask = np.concatenate([np.ones((len(prompts), TOKENS), bool), valid], 1)
    order = np.argsort(mask, axis=1, kind="stable")
    ids, mask = np.take_along_axis(ids, order, 1), np.take_along_axis(mask, order, 1)
    out = hf_model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                            token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                            pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                            do_sample=False, max_new_tokens=steps)[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, steps - out.shape[1])))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A sentencepiece model of fewer pieces than the LM's vocabulary (as when the vocabulary is rounded up)."""
    path = str(tmp_path_factory.mktemp("spm") / "spm.model")
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "circle", "square", "triangle", "small", "large", "on", "the", "left", "right"]
    train_tokenizer([" ".join(rng.choice(words, 6)) for _ in range(300)], path, vocab_size=40)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("gemma2", [False, True], ids=["gemma", "gemma2"])
def test_export_matches_transformers(tmp_path, spm_model, gemma2):
    """Logits of prefix-LM rows within 1e-3 (the issue's bar), image features within 1e-4, and greedy answers
    token for token, from a folder transformers loads with no missing, unexpected or mismatched key. The image
    token id is the tokenizer's vocabulary size: a row of the embedding (Gemma 1 case, 40 pieces for 64 rows) or
    past it (Gemma 2 case, no tokenizer: 64)."""
    config = vlm_config(gemma2)
    if not gemma2:
        config.data.tokenizer = spm_model
    task, model, params = build(config)
    hf_config, _ = write_folder(tmp_path, config, params)
    assert hf_config["text_config"]["model_type"] == ("gemma2" if gemma2 else "gemma")
    image_id = hf_config["image_token_index"]
    assert image_id == (VOCAB if gemma2 else Tokenizer(spm_model).vocab_size) and image_id >= 30
    hf_model = load_hf(tmp_path)
    ours, hf = prefix_lm_rows(np.random.default_rng(1), prefix_lens=[1, 2], suffix_len=5, image_id=image_id)
    with torch.no_grad():
        out = hf_model(**hf)
        features = hf_model.model.get_image_features(hf["pixel_values"]).pooler_output
    assert max_diff(model.encode_images(ours["images"]), features) < 1e-4
    logits = model(ours)
    assert max_diff(logits, out.logits) < 1e-3
    assert np.abs(np.asarray(logits)).max() > 1  # the comparison is not between near-zero numbers

    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)
    prompts = np.array([[0, BOS, 9, 12], [BOS, 5, 6, 7]])  # row 0 left-padded; image + prompt fit the window
    answers = greedy_ours(task, model, images, prompts, steps=8)
    with torch.no_grad():
        np.testing.assert_array_equal(greedy_hf(hf_model, images, prompts, steps=8), answers)
    assert len(set(answers.ravel().tolist())) > 2


def scanned(params):
    """Our non-scan parameters in the scanned layout (layers stacked on axis 0)."""
    image = params["image_encoder"]
    blocks = stack_layers(unstack_layers(image["encoder"]["blocks"], False), True)
    lm_blocks = stack_layers(unstack_layers(params["lm"]["blocks"], False), True)
    return {**params, "image_encoder": {**image, "encoder": {**image["encoder"], "blocks": blocks}},
            "lm": {**params["lm"], "blocks": lm_blocks}}


def test_scan_and_non_scan_export_alike_and_import_into_both_layouts():
    config, scan_config = vlm_config(True), vlm_config(True, scan=True)
    _, _, params = build(config)
    hf_config, tensors = paligemma_export(params, config)
    scan_hf_config, scan_tensors = paligemma_export(scanned(params), scan_config)
    assert scan_hf_config == hf_config and tensors.keys() == scan_tensors.keys()
    assert all(np.array_equal(tensors[key], scan_tensors[key]) for key in tensors)
    for scan, want in ((False, params), (True, scanned(params))):
        imported, _, reader = paligemma_import(tensors, hf_config, scan)
        assert jax.tree.structure(imported) == jax.tree.structure(want)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, imported, want)))
    scan_model = get_task(scan_config).build_model(nnx.Rngs(0))  # the imported tree loads into a scan model
    state = nnx.state(scan_model, nnx.Param)
    nnx.replace_by_pure_dict(state, imported)
    assert reader.report()[-1] == f"PaliGemma weights: {len(tensors)} loaded, 0 missing, 0 mismatched, 0 unexpected"


def random_hf(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("text_type", ["gemma", "gemma2"])
def test_transformers_to_ours_to_transformers_is_bit_exact(tmp_path, text_type):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    text = dict(model_type=text_type, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8, vocab_size=80)
    if text_type == "gemma2":
        text.update(query_pre_attn_scalar=8, sliding_window=6)
    hf_config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=12,
                           vision_use_head=False),
        text_config=text, image_token_index=80, vocab_size=80, projection_dim=48, hidden_size=48)
    random_hf(PaliGemmaForConditionalGeneration(hf_config)).save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path)
    folder_config = json.loads((tmp_path / "config.json").read_text())
    params, values, reader = paligemma_import(tensors, folder_config, scan=False)
    assert values["lm.size"] == {"gemma": "gemma-2b", "gemma2": "gemma2-2b"}[text_type]
    assert values["image.variant"] == "B/4" and values["image.width"] == 32
    assert reader.report()[-1].endswith("0 missing, 0 mismatched, 0 unexpected")
    config = configured(values, "vlm", False)
    _, loaded, _ = load_folder(str(tmp_path))  # the import CLI's path
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, params)))
    spec = gemma_config(config.model).spec()
    assert (spec.layer_pattern, spec.window, spec.post_norms) == (("LG", 6, True) if text_type == "gemma2"
                                                                   else ("G", None, False))
    exported_config, exported = paligemma_export(params, config)
    want = canonical_names(tensors)
    assert exported.keys() == want.keys()
    assert all(np.array_equal(exported[key], want[key]) for key in want)
    resolved = PaliGemmaConfig.from_dict(exported_config)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size"):
        assert getattr(resolved.text_config, key) == getattr(hf_config.text_config, key)
    if text_type == "gemma2":
        assert resolved.text_config.layer_types == hf_config.text_config.layer_types
        assert resolved.text_config.sliding_window == 6


def test_gemma_import_round_trip_and_logits(tmp_path):
    """Gemma2ForCausalLM -> our `lm` subtree: the same tensors back, and its logits on a causal text."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    hf_config = Gemma2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=VOCAB,
                             sliding_window=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    hf_model = random_hf(Gemma2ForCausalLM(hf_config)).eval()
    hf_model.save_pretrained(tmp_path)
    tensors = read_safetensors(tmp_path)
    lm_params, values, reader = gemma_import(tensors, json.loads((tmp_path / "config.json").read_text()), True)
    reader.check()
    config = configured(values, "vlm", True)
    spec = gemma_config(config.model).spec()
    assert (spec.window, spec.layer_pattern, spec.attn_softcap, spec.final_softcap) == (4, "LG", 5.0, 3.0)
    back = export_flat({"lm": lm_params}, True, gemma_rules("lm", "model", spec))
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k], tensors[k]) for k in tensors)

    from vlm_jax.models.gemma import GemmaLM
    lm = GemmaLM(gemma_config(config.model), nnx.Rngs(0))
    state = nnx.state(lm, nnx.Param)
    nnx.replace_by_pure_dict(state, lm_params)
    nnx.update(lm, state)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    logits = lm.logits(lm(lm.embed(jnp.asarray(ids)), positions, MaskSpec(causal=True)))
    with torch.no_grad():
        assert max_diff(logits, hf_model(torch.from_numpy(ids)).logits) < 1e-4


def test_a_vlm_initialises_its_lm_from_a_gemma_folder(tmp_path):
    """init_from {"lm": {"hf": FOLDER}}: the VLM's LM equals the imported GemmaForCausalLM, with the key report."""
    from transformers import GemmaConfig, GemmaForCausalLM
    from vlm_jax.hf.load import load_folder
    from vlm_jax.param_init import initialise_from
    from vlm_jax.parallel.mesh import make_mesh
    from vlm_jax.pytree import leaves_with_path_str
    from vlm_jax.train_state import init_train_state, make_state_layout

    config = vlm_config()
    spec = gemma_config(config.model).spec()
    random_hf(GemmaForCausalLM(GemmaConfig(
        hidden_size=spec.width, intermediate_size=spec.mlp_dim, num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        vocab_size=VOCAB))).save_pretrained(tmp_path / "gemma")
    mesh = make_mesh(config.mesh)
    layout = make_state_layout(get_task(config), config, mesh)
    lines = []
    state = initialise_from(init_train_state(layout, 0), {"lm": {"hf": str(tmp_path / "gemma")}}, layout, mesh,
                            lines.append, config.model.scan)
    _, imported, _ = load_folder(str(tmp_path / "gemma"), config.model.scan)
    got = dict(leaves_with_path_str(state["params"]["lm"]))
    for path, value in leaves_with_path_str(imported["lm"]):
        np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)
    assert any("0 missing, 0 mismatched, 0 unexpected" in line for line in lines)


@pytest.mark.parametrize("change, message", [
    ({"vlm.projector": "mlp"}, "model.vlm.projector 'mlp'"),
    ({"cls_token": True}, "no transformers key: image_encoder/cls_token"),
    ({"image.posemb": "sincos2d"}, "image posemb 'sincos2d'"),
    ({"arch": "clip"}, "model.arch is 'clip'"),
    ({"lm.qk_norm": True}, "qk_norm"),
    ({"lm.attn_softcap": 50.0}, "without post-norms but with model.lm.attn_softcap"),
    ({"lm.post_norms": True, "lm.window": 8, "lm.layer_pattern": "LG", "lm.rope_base": 1e6},
     "rope_base_local 10000.0 != rope_base 1000000.0"),
])
def test_what_paligemma_cannot_express_is_refused_in_one_line(change, message):
    config = vlm_config()
    for key, value in change.items():
        if key != "cls_token":
            *parents, name = key.split(".")
            functools.reduce(getattr, parents, config.model)[name] = value
    _, _, params = build(config)
    if "cls_token" in change:
        params["image_encoder"]["cls_token"] = np.zeros(32, np.float32)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        paligemma_export(params, config)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_realistic_size_export_matches_transformers(tmp_path):
    """ViT-B/16 at 224 px (196 image tokens) and a small Gemma 2 (width 256, 2 layers, GQA 4:1, head_dim 64)."""
    config = vlm_config(gemma2=True, image=("B", 16, 224), vocab=1024, width=256, depth=2, mlp_dim=1024,
                        num_heads=4, num_kv_heads=1, head_dim=64, window=256)
    _, model, params = build(config)
    write_folder(tmp_path, config, params)
    hf_model = load_hf(tmp_path)
    ours, hf = prefix_lm_rows(np.random.default_rng(1), prefix_lens=[3], suffix_len=6, image_id=1024,
                              image_size=224, patch=16)
    with torch.no_grad():
        out = hf_model(**hf)
        features = hf_model.model.get_image_features(hf["pixel_values"]).pooler_output
    assert max_diff(model.encode_images(ours["images"]), features) < 1e-4
    assert max_diff(model(ours), out.logits) < 1e-3
