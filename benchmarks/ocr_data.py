"""Real OCR networks (PP-OCRv4 from the ``rapidocr-onnxruntime`` wheel, installed without its
dependencies by ``make setup``) and inputs for them: text lines rendered with the machine's
DejaVu fonts from words of qgraph's default text, preprocessed as RapidOCR does, and the CTC
decoding of the recognizer's output. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
REC_SHAPE = (3, 48, 320)  # RapidOCR's rec_img_shape
CLS_SHAPE = (3, 48, 192)  # RapidOCR's cls_image_shape


def models_dir() -> Path | None:
    """The folder of the packaged ONNX models, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder if folder.is_dir() else None


def model_path(kind: str) -> Path:
    names = {
        "rec": "ch_PP-OCRv4_rec_infer.onnx",
        "det": "ch_PP-OCRv4_det_infer.onnx",
        "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    }
    folder = models_dir()
    if folder is None:
        raise FileNotFoundError("rapidocr-onnxruntime is not installed (make setup installs it)")
    return folder / names[kind]


def fonts_available() -> bool:
    return all((FONT_DIR / f).is_file() for f in FONTS)


def text_lines(count: int, seed: int, split: str = "eval") -> list[str]:
    """Lines of 1-3 words (letters and digits, 4-22 characters) from qgraph's default text."""
    from qgraph.data import load_text

    words = [w for w in re.findall(r"[A-Za-z][A-Za-z0-9]{1,11}", load_text(None, split))]
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < count:
        n = rng.choice((1, 2, 2, 3))
        line = " ".join(rng.choice(words) for _ in range(n))
        if rng.random() < 0.25:
            line += f" {rng.randint(0, 9999)}"
        if 4 <= len(line) <= 22:
            lines.append(line)
    return lines


def render_line(text: str, rng: random.Random) -> np.ndarray:
    """One text line as an RGB uint8 image ``[H, W, 3]``: dark text on a light background,
    a random DejaVu font, size, margins and contrast."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(FONT_DIR / rng.choice(FONTS)), rng.randint(26, 36))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = rng.randint(2, 10), rng.randint(3, 8)
    size = (right - left + 2 * pad_x, bottom - top + 2 * pad_y)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    return np.asarray(image)


def rec_input(image: np.ndarray, shape: tuple[int, int, int] = REC_SHAPE) -> np.ndarray:
    """RapidOCR's preprocessing: resize to the model height keeping the aspect ratio (at most
    the model width), scale to [-1, 1], pad the width with zeros. Returns ``[3, H, W]``."""
    from PIL import Image

    channels, height, width = shape
    h, w = image.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(image).resize((resized_w, height), Image.BILINEAR))
    chw = resized.astype(np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros(shape, dtype=np.float32)
    out[:, :, :resized_w] = (chw - 0.5) / 0.5
    return out


def text_batch(
    count: int, seed: int, split: str = "eval", shape: tuple[int, int, int] = REC_SHAPE
) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered lines as model inputs ``[count, 3, H, W]`` and their texts."""
    rng = random.Random(seed + 7919)
    lines = text_lines(count, seed, split)
    images = np.stack([rec_input(render_line(t, rng), shape) for t in lines])
    return images, lines


def characters(rec_model: Path) -> list[str]:
    """The recognizer's alphabet from its metadata, with CTC's blank first and a space last."""
    import onnx

    proto = onnx.load(str(rec_model), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, alphabet: list[str]) -> list[str]:
    """Greedy CTC: the best class per step, repeats merged, blanks dropped."""
    best = probs.argmax(-1)
    out = []
    for row in best:
        chars, last = [], -1
        for k in row:
            if k != last and k != 0:
                chars.append(alphabet[k])
            last = k
        out.append("".join(chars))
    return out


def char_accuracy(pred: str, truth: str) -> float:
    """1 - Levenshtein distance / len(truth), floored at 0."""
    prev = list(range(len(truth) + 1))
    for i, p in enumerate(pred, 1):
        cur = [i]
        for j, t in enumerate(truth, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (p != t)))
        prev = cur
    return max(0.0, 1 - prev[-1] / max(len(truth), 1))


DET_SHAPE = (3, 320, 320)


def text_page(seed: int, shape: tuple[int, int, int] = DET_SHAPE) -> np.ndarray:
    """A page for the detector: 3-6 rendered lines pasted at random places on a light
    background, normalized as RapidOCR's detector expects (mean 0.5, std 0.5). ``[3, H, W]``."""
    from PIL import Image

    rng = random.Random(seed)
    _, height, width = shape
    page = Image.new("RGB", (width, height), tuple(rng.randint(215, 255) for _ in range(3)))
    for k, text in enumerate(text_lines(rng.randint(3, 6), seed * 31 + 7)):
        line = Image.fromarray(render_line(text, rng))
        scale = min(1.0, (width - 10) / line.width) * rng.uniform(0.5, 0.9)
        line = line.resize((max(1, int(line.width * scale)), max(1, int(line.height * scale))))
        x = rng.randint(0, max(0, width - line.width))
        y = min(height - line.height, k * height // 6 + rng.randint(0, 12))
        page.paste(line, (x, max(0, y)))
    chw = np.asarray(page).astype(np.float32).transpose(2, 0, 1) / 255.0
    return (chw - 0.5) / 0.5


def page_batch(count: int, seed: int) -> np.ndarray:
    return np.stack([text_page(seed * 1000 + i) for i in range(count)])
