"""Synthetic compositional image-caption data: one coloured shape per image.

A class is a (colour, shape) pair. Each image shows one shape of the class colour in one of nine
cells, small or large, on a grey background (dark or light) with mild noise; grey tones never get
confused with the saturated class colours. Captions vary their wording and mention colour and shape,
and often the position, the size or the background.
"""

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "yellow": (240, 215, 20),
    "purple": (145, 45, 190),
    "cyan": (20, 200, 210),
}
SHAPE_SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "disk", "round shape"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangular shape", "wedge"],
    "cross": ["cross", "plus sign", "plus shape"],
}
# How often a caption names the shape by the class word (else by a synonym such as "disk").
SYNONYM_RATE = [0.9]
ZERO_SHOT_TEMPLATES: list[str] = [
    "a {}.",
    "a photo of a {}.",
    "a {} shape.",
    "an image of a {}.",
    "there is a {} in the picture.",
]

_ROWS = [("top", "upper"), ("middle", "centre"), ("bottom", "lower")]
_COLS = [("left",), ("centre", "middle"), ("right",)]
_SIZES = {"small": ["small", "tiny", "little"], "large": ["large", "big", "huge"]}
_BACKGROUNDS = {"dark": ["dark", "black", "dark grey"], "light": ["light", "white", "light grey"]}
_TEMPLATES = [
    "a {size} {color} {shape} {pos}",
    "{where}: {size} {color} {shape} on a {bg} background",
    "there is a {color} {shape} {pos}",
    "a photo of a {color} {shape}",
    "{size} {color} {shape}, {bg} background",
    "an image showing a {color} {shape} {pos}",
    "the {shape} in this picture is {color}",
    "{color} {shape} {pos}, {bg} backdrop",
    "a {bg} image with a {size} {color} {shape} {pos}",
    "one {color} {shape}",
    "a {color} {shape} on a {bg} background",
    "{where}, a {color} {shape}",
    "{color} {shape}",
    "a {size} {shape}, coloured {color}, {pos}",
]


def class_names() -> list[str]:
    """Class names "colour shape", colour-major; the label is the index into this list."""
    return [f"{c} {s}" for c in COLORS for s in SHAPE_SYNONYMS]


def _where(row: int, col: int, rng: np.random.Generator) -> str:
    """Short position name such as "top left" or "centre"."""
    if row == 1 and col == 1:
        return str(rng.choice(["centre", "middle", "center"]))
    r, c = str(rng.choice(_ROWS[row])), str(rng.choice(_COLS[col]))
    if row == 1:
        return f"{c}" if rng.random() < 0.5 else f"middle {c}"
    if col == 1:
        return r
    return f"{r} {c}" if rng.random() < 0.7 else f"{r}-{c}"


def _position_phrase(row: int, col: int, rng: np.random.Generator) -> str:
    """Prepositional phrase such as "in the top left corner" or "near the bottom"."""
    where = _where(row, col, rng)
    if row != 1 and col != 1:
        return str(rng.choice([f"in the {where} corner", f"in the {where}", f"at the {where}"]))
    if row == 1 and col == 1:
        return str(rng.choice([f"in the {where}", f"at the {where} of the image"]))
    side = "side" if row == 1 else "edge"
    return str(rng.choice([f"near the {where}", f"at the {where}", f"on the {where} {side}"]))


def _article(text: str) -> str:
    """Fixes "a" -> "an" before a vowel for every word boundary in text."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i].lower() == "a" and words[i + 1][:1].lower() in "aeiou":
            words[i] = words[i] + "n"
    return " ".join(words)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draws shape centred at (cx, cy) with half-size r."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def make_example(rng: np.random.Generator, label: int, image_size: int = 64) -> tuple[Image.Image, str]:
    """Renders one image of class `label` and a caption for it."""
    color, shape = class_names()[label].split(" ")
    row, col = int(rng.integers(3)), int(rng.integers(3))
    size = "large" if rng.random() < 0.5 else "small"
    bg = "dark" if rng.random() < 0.5 else "light"
    tone = int(rng.integers(25, 95) if bg == "dark" else rng.integers(165, 240))

    r = image_size * (rng.uniform(0.25, 0.32) if size == "large" else rng.uniform(0.15, 0.2))
    cell = image_size / 3
    cx = np.clip((col + 0.5 + rng.uniform(-0.15, 0.15)) * cell, r + 1, image_size - r - 1)
    cy = np.clip((row + 0.5 + rng.uniform(-0.15, 0.15)) * cell, r + 1, image_size - r - 1)
    img = Image.new("RGB", (image_size, image_size), (tone, tone, tone))
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLORS[color])
    noise = rng.normal(0.0, rng.uniform(2.0, 6.0), (image_size, image_size, 1))
    pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)

    caption = str(rng.choice(_TEMPLATES)).format(
        size=rng.choice(_SIZES[size]),
        color=color,
        shape=shape if rng.random() < SYNONYM_RATE[0] else rng.choice(SHAPE_SYNONYMS[shape][1:]),
        pos=_position_phrase(row, col, rng),
        where=_where(row, col, rng),
        bg=rng.choice(_BACKGROUNDS[bg]),
    )
    return Image.fromarray(pixels), _article(caption)


_SHAPE_WORDS = {"circle": ("circle", "disk", "round"), "square": ("square", "box", "block"),
                "triangle": ("triangle", "triangular", "wedge"), "cross": ("cross", "plus")}


def named_classes(text: str) -> tuple[set[str], set[str]]:
    """(colours, shapes) a caption names, shapes by class word or synonym."""
    words = set(text.lower().replace(",", " ").replace(":", " ").replace("-", " ").split())
    return ({color for color in COLORS if color in words},
            {shape for shape, names in _SHAPE_WORDS.items() if words & set(names)})


def caption_names_its_class(caption: str, references: list[str]) -> bool:
    """Whether a generated caption names exactly the colour and the shape its reference captions name."""
    return named_classes(caption) == named_classes(" ".join(references))


def main(argv: list[str] | None = None) -> int:
    """python -m data_pipelines.synthetic FILE.jsonl: the share of generated captions ({"caption", "references"}
    lines, as vlm_jax's captioning evaluator and vlm_jax.generate write them) that name the right colour and
    shape."""
    import json
    import sys
    paths = sys.argv[1:] if argv is None else argv
    for path in paths:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        scored = [r for r in records if r.get("references")]
        right = sum(caption_names_its_class(r["caption"], r["references"]) for r in scored)
        print(json.dumps({"file": path, "captions": len(scored),
                          "colour_and_shape_named": round(right / max(len(scored), 1), 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
