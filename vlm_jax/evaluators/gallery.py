"""A self-contained HTML page of images with their generated and reference captions (for captioning evals)."""

from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
from etils import epath
from PIL import Image

from vlm_jax.workdir import resolve

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { width: 260px; margin: 0; padding: 8px; border: 1px solid #ccc; border-radius: 4px; }
img { width: 128px; image-rendering: pixelated; display: block; }
.generated { font-weight: bold; margin: 6px 0 2px; }
ul { margin: 0; padding-left: 1.2em; color: #444; font-size: 90%; }
"""


def _to_uint8(images) -> np.ndarray:
    """[N,H,W,C] uint8 as given; floats in [-1, 1] mapped to 0..255."""
    array = np.asarray(images)
    if array.dtype != np.uint8:
        array = np.clip(np.round((array.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 3] (or 1 channel), got shape {array.shape}")
    return array


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_gallery(path: str | os.PathLike | epath.Path, images, generated: list[str],
                  references: list[list[str]], title: str, max_items: int = 64) -> None:
    """Writes an HTML page to `path` (local, gs:// or s3://): the first `max_items` images (embedded as PNG
    data URIs, shown 128 px wide with pixelated upscaling) each with its generated caption and its reference
    captions, all text HTML-escaped."""
    array = _to_uint8(images)
    if not len(array) == len(generated) == len(references):
        raise ValueError(f"{len(array)} images, {len(generated)} generated captions, {len(references)} reference lists")
    items = []
    for image, caption, refs in list(zip(array, generated, references))[:max_items]:
        ref_items = "".join(f"<li>{html.escape(ref)}</li>" for ref in refs)
        items.append(f'<figure><img src="{_png_data_uri(image)}" alt="">'
                     f'<figcaption><p class="generated">{html.escape(caption)}</p>'
                     f'<ul>{ref_items}</ul></figcaption></figure>')
    page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            f'<p>{len(items)} of {len(array)} examples: generated caption in bold, references below.</p>\n'
            f'<div class="grid">\n' + "\n".join(items) + "\n</div></body></html>\n")
    target = path if isinstance(path, epath.Path) else resolve(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page)


def render_gallery_png(images, generated: list[str], references: list[list[str]], columns: int = 4,
                       max_items: int = 16, scale: int = 4) -> bytes:
    """The first `max_items` examples as one PNG (each image upscaled `scale` times, the generated caption
    and the first reference under it): the gallery where no browser is at hand (terminals, READMEs)."""
    from PIL import ImageDraw, ImageFont
    array = _to_uint8(images)[:max_items]
    height, width = array.shape[1] * scale, array.shape[2] * scale
    cell_w, cell_h = max(width, 232) + 8, height + 40
    rows = -(-len(array) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for index, image in enumerate(array):
        x, y = (index % columns) * cell_w, (index // columns) * cell_h
        tile = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        sheet.paste(tile.resize((width, height), Image.NEAREST), (x + 4, y + 4))
        draw.text((x + 4, y + height + 8), generated[index][:48], fill="black", font=font)
        draw.text((x + 4, y + height + 22), (references[index] or [""])[0][:48], fill="grey", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
