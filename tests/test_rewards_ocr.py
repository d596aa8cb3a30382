"""OCR reward: the text-similarity math, and Tesseract reading text rendered with Pillow."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from mixgrpo.rewards import REWARDS, RewardError
from mixgrpo.rewards.ocr import levenshtein, quoted_text, text_similarity

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None,
                                     reason="tesseract is not installed (apt-get install -y tesseract-ocr)")


def test_quoted_text_takes_straight_and_curly_quotes_and_joins_parts():
    assert quoted_text('a sign that says "Hello World"') == "Hello World"
    assert quoted_text("a poster with \u201cbig\u201d and \"sale\"") == "big sale"
    assert quoted_text("a cat") == ""


def test_levenshtein_counts_edits():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_similarity_ignores_case_and_spaces_and_is_clipped_at_zero():
    assert text_similarity("HELLO\nwor ld", "hello world") == 1.0
    assert text_similarity("hellx world", "hello world") == pytest.approx(1 - 1 / 10)
    assert text_similarity("", "hello") == 0.0
    assert text_similarity("a very long unrelated text", "hi") == 0.0


def render(text: str) -> torch.Tensor:
    """Black text in Pillow's bundled font, 56 px, on a white 640x200 image: [3, H, W] in [0, 1]."""
    image = Image.new("RGB", (640, 200), (255, 255, 255))
    ImageDraw.Draw(image).text((40, 60), text, fill=(0, 0, 0), font=ImageFont.load_default(size=56))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@needs_tesseract
def test_tesseract_reads_rendered_text_and_scores_the_right_prompt_highest():
    images = torch.stack([render("Hello World"), render("Open Sesame")])
    reward = REWARDS.get("ocr")()
    right = reward(images, ['a sign that says "hello world"', 'a door with "open sesame" written on it'])
    wrong = reward(images, ['a sign that says "goodbye moon"', 'a door with "hello world" written on it'])
    assert right.dtype == torch.float32 and right.shape == (2,)
    assert (right >= 0.9).all(), right
    assert (wrong <= 0.5).all(), wrong


@needs_tesseract
def test_a_blank_image_scores_zero_not_an_error():
    assert REWARDS.get("ocr")()(torch.ones(1, 3, 64, 64), ['"hello"']).tolist() == [0.0]


def test_a_prompt_without_quoted_text_is_an_error():
    with pytest.raises(RewardError, match="no text in double quotes"):
        REWARDS.get("ocr")()(torch.ones(1, 3, 8, 8), ["a cat"])


def test_a_missing_tesseract_names_the_install_command():
    reward = REWARDS.get("ocr")(binary="tesseract-that-is-not-installed")
    with pytest.raises(RewardError, match="apt-get install -y tesseract-ocr"):
        reward(torch.ones(1, 3, 8, 8), ['"hello"'])


@needs_tesseract
def test_a_tesseract_failure_is_an_error_with_its_message():
    reward = REWARDS.get("ocr")(lang="xx-no-such-language")
    with pytest.raises(RewardError, match="tesseract failed"):
        reward(torch.ones(1, 3, 32, 32), ['"hello"'])
