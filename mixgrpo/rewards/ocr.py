"""OCR reward: does the image show the text quoted in the prompt? (Flow-GRPO's text-rendering task.)

The image is read by Tesseract (the `tesseract` command-line program, Debian package `tesseract-ocr`), one
process per image, several at once. The target is the text between double quotes in the prompt
('a sign that says "hello world"' -> "hello world"; several quoted parts are joined by a space).

score = 1 - min(d, |t|) / |t|, d = Levenshtein(norm(recognised), t), t = norm(target),
norm = lower-case with all whitespace removed (the convention of Flow-GRPO's OCR reward): 1 for an exact
read, 0 when nothing of the target is there. A prompt without quoted text, a missing `tesseract` or a
Tesseract error is a RewardError (never a 0).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from mixgrpo.errors import ConfigError
from mixgrpo.images import to_pil
from mixgrpo.rewards.base import REWARDS, RewardError, check_batch

_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')  # straight or curly double quotes


def quoted_text(prompt: str) -> str:
    """The text between double quotes ("..." or \u201c...\u201d) in a prompt, parts joined by a space; '' if none."""
    return " ".join(a or b for a, b in _QUOTED.findall(prompt)).strip()


def normalise_text(text: str) -> str:
    """Lower-case, all whitespace removed: OCR line breaks and spacing do not count."""
    return re.sub(r"\s+", "", text).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def text_similarity(recognised: str, target: str) -> float:
    """1 - min(d, |t|) / |t| with d = levenshtein(norm(recognised), t), t = norm(target); in [0, 1]."""
    t = normalise_text(target)
    if not t:
        raise ConfigError("the target text is empty")
    return 1.0 - min(levenshtein(normalise_text(recognised), t), len(t)) / len(t)


def to_png(image: torch.Tensor) -> bytes:
    """[3, H, W] in [0, 1] -> PNG bytes (8-bit RGB)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


class OcrReward:
    """`reward(images, prompts) -> [B]`: Tesseract reads each image; the score compares it to the quoted text."""

    name = "ocr"

    def __init__(self, binary: str = "tesseract", lang: str = "eng", psm: int = 11, workers: int = 2,
                 timeout: float = 60.0):
        if workers < 1:
            raise ConfigError(f"ocr: workers must be >= 1, got {workers}")
        self.binary, self.lang, self.psm, self.workers, self.timeout = binary, lang, psm, workers, timeout
        self._path: str | None = None

    def check(self) -> None:
        """The Tesseract program is on PATH (run by the pre-flight, before any model loads); RewardError naming the
        install command otherwise."""
        if self._path is None:
            self._path = shutil.which(self.binary)
            if self._path is None:
                raise RewardError(f"ocr: the Tesseract program {self.binary!r} is not on PATH: apt-get install -y "
                                  f"tesseract-ocr (Debian/Ubuntu), or set args.binary to the program's path")

    def read(self, png: bytes) -> str:
        """The text Tesseract recognises in one PNG image (piped through stdin)."""
        assert self._path is not None
        # one thread per process: the pool runs several processes at once
        env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
        command = [self._path, "stdin", "stdout", "-l", self.lang, "--psm", str(self.psm)]
        try:
            result = subprocess.run(command, input=png, capture_output=True, timeout=self.timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise RewardError(f"ocr: tesseract took more than {self.timeout} s on one image") from e
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace").strip()
            raise RewardError(f"ocr: tesseract failed (exit {result.returncode}): {stderr}; for a missing "
                              f"language install its data, e.g. apt-get install -y tesseract-ocr-{self.lang}")
        return result.stdout.decode(errors="replace")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch("ocr", images, prompts)
        targets = [quoted_text(p) for p in prompts]
        for prompt, target in zip(prompts, targets):
            if not normalise_text(target):
                raise RewardError(f'ocr: prompt {prompt!r} has no text in double quotes to read; the OCR reward '
                                  f'needs prompts such as \'a sign that says "hello"\'')
        self.check()
        pngs = [to_png(image) for image in images]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            texts = list(pool.map(self.read, pngs))
        return torch.tensor([text_similarity(t, target) for t, target in zip(texts, targets)], dtype=torch.float32)


@REWARDS.register("ocr")
def ocr(binary: str = "tesseract", lang: str = "eng", psm: int = 11, workers: int = 2,
        timeout: float = 60.0) -> OcrReward:
    """OCR similarity to the quoted text: score = 1 - min(d, |t|) / |t| (see the module docstring).

    psm 11 is Tesseract's "sparse text" page mode: text anywhere in a scene, not a page layout.
    """
    return OcrReward(binary=binary, lang=lang, psm=psm, workers=workers, timeout=timeout)
