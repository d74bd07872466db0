"""SigLIP / CLIP two towers and vision towers against transformers: exported folders load with no missing,
unexpected or mismatched keys and compute the same embeddings and logits; imports round-trip bit-exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from vlm_jax.config import ConfigError, base_config
from vlm_jax.hf import contrastive
from vlm_jax.hf.load import load_folder
from vlm_jax.hf.weights import unstack_all, write_safetensors
from vlm_jax.models.two_towers import l2_normalize
from vlm_jax.pytree import leaves_with_path_str
import vlm_jax.train_state  # noqa: F401  (flax_always_shard_variable False, before any model is built)
from vlm_jax.tasks import get_task

TOKEN_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 3}
VOCAB, LENGTH = 50, 8


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def tiny_config(kind: str, scan: bool = False, image_size: int = 16, variant: str = "mu/8", width: int = 32,
                depth: int = 2, heads: int = 4, mlp: int = 48):
    c = base_config()
    c.model.scan = scan
    c.model.image.variant, c.model.image.image_size = variant, image_size
    c.model.text.vocab_size, c.model.text.max_len = VOCAB, LENGTH
    for tower in (c.model.image, c.model.text):
        tower.width, tower.depth, tower.num_heads, tower.mlp_dim = width, depth, heads, mlp
    if kind == "siglip":
        c.model.loss, c.model.image.pool, c.model.text.pool = "sigmoid", "map", "last"
        c.model.image_projection, c.model.embed_dim = False, width
    else:
        c.model.arch, c.model.loss, c.model.image.pool, c.model.text.pool = "clip", "softmax", "tok", "eos"
        c.model.embed_dim = 24
    return c


def random_model(config, seed: int = 0):
    """The model of `config` with every parameter perturbed (biases and norms are not left at 0 / 1)."""
    model = get_task(config).build_model(nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def params_of(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def write_folder(tmp_path, config, params, kind):
    out = str(tmp_path / kind)
    hf_config = contrastive.hf_config(config, kind, TOKEN_IDS)
    import os
    os.makedirs(out)
    hf_config.save_pretrained(out)
    write_safetensors(contrastive.export_tensors(params, config, kind), out)
    return out


def inputs(image_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (3, image_size, image_size, 3)).astype(np.float32)
    tokens = np.zeros((4, LENGTH), np.int32)
    for row, n in enumerate((2, 5, 7, 3)):  # EOS after n ids, then padding (one row fills the length)
        tokens[row, :n] = rng.integers(4, VOCAB, n)
        tokens[row, n] = 1
    return pixels, tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind, cls", [("siglip", transformers.SiglipModel), ("clip", transformers.CLIPModel)])
def test_two_towers_export_matches_transformers(tmp_path, kind, cls):
    config = tiny_config(kind)
    model = random_model(config)
    out = write_folder(tmp_path, config, params_of(model), kind)
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    pixels, tokens = inputs(config.model.image.image_size)
    zimg, ztxt = np.asarray(model.embed_image(jnp.asarray(pixels))), np.asarray(model.embed_text(jnp.asarray(tokens)))
    t, b = model.temperature()
    ours_logits = np.exp(float(t)) * zimg @ ztxt.T + (0.0 if b is None else float(b))
    with torch.no_grad():
        kwargs = {} if kind == "siglip" else {"attention_mask": torch.from_numpy((tokens != 0).astype(np.int64))}
        outputs = hf(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                     pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)), **kwargs)
    np.testing.assert_allclose(outputs.image_embeds.numpy(), zimg, atol=1e-4, rtol=0)
    np.testing.assert_allclose(outputs.text_embeds.numpy(), ztxt, atol=1e-4, rtol=0)
    np.testing.assert_allclose(outputs.logits_per_image.numpy(), ours_logits, atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_scanned_and_unscanned_checkpoints_export_alike(kind):
    scanned = tiny_config(kind, scan=True)
    model = random_model(scanned)
    params = params_of(model)
    flat = unstack_all(params, True)
    unscanned = tiny_config(kind, scan=False)
    plain = get_task(unscanned).build_model(nnx.Rngs(0))
    nnx.update(plain, jax.tree.map(jnp.asarray, flat))
    pixels, tokens = inputs(16)
    np.testing.assert_allclose(np.asarray(model.embed_image(pixels)), np.asarray(plain.embed_image(pixels)),
                               atol=1e-6)  # the same weights: a scanned loop only rounds differently
    a = contrastive.export_tensors(params, scanned, kind)
    b = contrastive.export_tensors(params_of(plain), unscanned, kind)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def random_hf(kind: str):
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=LENGTH, **TOKEN_IDS)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    if kind == "siglip":
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    elif kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config={**text, "hidden_act": "quick_gelu"}, vision_config={**vision, "hidden_act": "quick_gelu"},
            projection_dim=24))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["siglip", "clip", "siglip_vision"])
@pytest.mark.parametrize("scan", [False, True])
def test_transformers_to_ours_to_transformers_is_bit_exact(tmp_path, kind, scan):
    hf = random_hf(kind)
    hf.save_pretrained(tmp_path / "source")
    config, params, reader = load_folder(str(tmp_path / "source"), scan=scan)
    reader.check()
    assert not reader.unexpected and not reader.missing and not reader.mismatched
    export_kind = "vision" if kind == "siglip_vision" else kind
    tensors = contrastive.export_tensors(params, config, export_kind)
    original = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert tensors.keys() == original.keys()
    for key in original:
        assert tensors[key].dtype == np.float32
        np.testing.assert_array_equal(tensors[key], original[key], err_msg=key)


def test_imported_siglip_computes_what_transformers_does(tmp_path):
    hf = random_hf("siglip")
    hf.save_pretrained(tmp_path / "source")
    config, params, _ = load_folder(str(tmp_path / "source"))
    model = get_task(config).build_model(nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    pixels, tokens = inputs(16)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                 pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(model.embed_image(pixels)), out.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.embed_text(tokens)), out.text_embeds.numpy(), atol=1e-4)


def test_vision_tower_exports_as_vision_model(tmp_path):
    config = tiny_config("siglip")
    model = random_model(config)
    out = write_folder(tmp_path, config, params_of(model), "vision")
    hf, info = transformers.SiglipVisionModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    pixels, _ = inputs(16)
    with torch.no_grad():
        pooled = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()
    np.testing.assert_allclose(pooled, np.asarray(model.image_encoder(pixels)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(l2_normalize(pooled)), np.asarray(model.embed_image(pixels)), atol=1e-4)


def test_mismatches_name_the_difference():
    config = tiny_config("siglip")
    config.model.image.pool = "gap"
    assert any("gap" in reason for reason in contrastive.siglip_mismatches(config.model))
    config = tiny_config("clip")
    config.model.loss = "sigmoid"
    assert contrastive.clip_mismatches(config.model) == ["the sigmoid loss (CLIPModel has no logit bias)"]
    with pytest.raises(ConfigError, match="not exactly a siglip"):
        from vlm_jax.hf.export import resolve_kind
        resolve_kind(tiny_config("clip"), "siglip")


@pytest.mark.slow
def test_realistic_siglip_b16_shapes_match_transformers(tmp_path):
    """SigLIP B/16 shapes (224 px, 12 layers of width 768) with random weights."""
    config = tiny_config("siglip", image_size=224, variant="B/16", width=768, depth=12, heads=12, mlp=3072)
    model = random_model(config)
    params = params_of(model)
    for path, _ in leaves_with_path_str(params):
        assert path
    out = write_folder(tmp_path, config, params, "siglip")
    hf = transformers.SiglipModel.from_pretrained(out)
    pixels, tokens = inputs(224)
    with torch.no_grad():
        outputs = hf(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                     pixel_values=torch.from_numpy(pixels[:2].transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(outputs.image_embeds.numpy(), np.asarray(model.embed_image(pixels[:2])), atol=1e-4)
    np.testing.assert_allclose(outputs.text_embeds.numpy(), np.asarray(model.embed_text(tokens)), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_lit_initialises_an_image_tower_from_a_siglip_folder(tmp_path, scan):
    from vlm_jax.param_init import initialise_from
    from vlm_jax.parallel.mesh import make_mesh
    from vlm_jax.train_state import init_train_state, make_state_layout

    hf = random_hf("siglip")
    hf.save_pretrained(tmp_path / "siglip")
    config = tiny_config("siglip", scan=scan, mlp=48)
    config.model.text.width = 64  # a text tower of its own (LiT trains it from scratch)
    mesh = make_mesh(config.mesh)
    layout = make_state_layout(get_task(config), config, mesh)
    lines = []
    state = initialise_from(init_train_state(layout, 0), {"image_encoder": {"hf": str(tmp_path / "siglip")}},
                            layout, mesh, lines.append, scan)
    _, imported, _ = load_folder(str(tmp_path / "siglip"), scan=scan)
    got = dict(leaves_with_path_str(state["params"]["image_encoder"]))
    for path, value in leaves_with_path_str(imported["image_encoder"]):
        np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)
    assert any("0 missing, 0 mismatched, 0 unexpected" in line for line in lines)


def test_an_export_never_drops_a_parameter():
    config = tiny_config("siglip")
    params = {**params_of(random_model(config)), "extra_head": {"kernel": np.zeros((3, 3), np.float32)}}
    with pytest.raises(ConfigError, match="parameters with no transformers key: extra_head/kernel"):
        contrastive.export_tensors(params, config, "siglip")


def test_captioner_exports_its_vision_tower_and_refuses_the_rest(tmp_path):
    """A captioner's ViT (every patch token, no head) is a SiglipVisionModel without head: last_hidden_state equal;
    asking for the whole model gets one line saying its decoder has no transformers class."""
    from vlm_jax.hf.export import resolve_kind
    config = tiny_config("siglip")
    config.task, config.model.decoder.size, config.model.decoder.depth = "captioning", "mu", 1
    model = random_model(config)
    assert resolve_kind(config, "auto") == "vision"
    with pytest.raises(ConfigError, match="captioning model has no transformers class"):
        resolve_kind(config, "siglip")
    out = write_folder(tmp_path, config, params_of(model), "vision")
    hf, info = transformers.SiglipVisionModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.vision_use_head is False
    pixels, _ = inputs(16)
    with torch.no_grad():
        hidden = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, np.asarray(model.image_encoder(pixels)), atol=1e-4)
