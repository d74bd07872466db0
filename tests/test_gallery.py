"""write_gallery: a self-contained HTML page with embedded PNGs and escaped captions."""

import base64
import html.parser
import io

import numpy as np
from etils import epath
from PIL import Image

from vlm_jax.evaluators.gallery import render_gallery_png, write_gallery


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text())
    collector.close()
    return collector


def test_gallery_embeds_images_and_escapes_captions(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    generated = ["a red car", "<script>alert(1)</script>", "two dogs & a cat"]
    references = [["a car", "red vehicle"], ["a bird"], ["dogs and a cat"]]
    write_gallery(str(tmp_path / "sub" / "gallery.html"), images, generated, references, title="step <10>")
    path = tmp_path / "sub" / "gallery.html"
    raw = path.read_text()
    assert "<script>" not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "image-rendering: pixelated" in raw

    page = _parse(path)
    assert "script" not in page.tags
    assert len(page.images) == 3
    prefix = "data:image/png;base64,"
    assert all(src.startswith(prefix) for src in page.images)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(page.images[0][len(prefix):]))))
    np.testing.assert_array_equal(decoded, images[0])
    text = "".join(page.text)
    assert "two dogs & a cat" in text and "red vehicle" in text and "step <10>" in text


def test_gallery_float_images_and_max_items(tmp_path):
    images = np.linspace(-1.0, 1.0, 5 * 4 * 4 * 3, dtype=np.float32).reshape(5, 4, 4, 3)
    path = epath.Path(tmp_path) / "g.html"
    write_gallery(path, images, [f"c{i}" for i in range(5)], [["r"]] * 5, title="t", max_items=2)
    page = _parse(path)
    assert len(page.images) == 2
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))))
    assert decoded.dtype == np.uint8 and decoded[0, 0, 0] == 0
    last = np.asarray(Image.open(io.BytesIO(base64.b64decode(page.images[1].split(",", 1)[1]))))
    np.testing.assert_array_equal(last, np.clip(np.round((images[1] + 1) * 127.5), 0, 255).astype(np.uint8))


def test_png_rendering_tiles_the_first_items():
    images = np.zeros((6, 8, 8, 3), np.uint8)
    png = render_gallery_png(images, ["a red box"] * 6, [["a red square"]] * 6, columns=4, max_items=5, scale=4)
    sheet = Image.open(io.BytesIO(png))
    assert sheet.size == (4 * (232 + 8), 2 * (32 + 40))  # 5 items on 4 columns: 2 rows
