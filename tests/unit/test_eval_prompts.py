"""DreamBench prompts and classes, and identifier stripping for CLIP-T."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dreambooth.eval.prompts import (
    DREAMBENCH_CLASSES,
    LIVE_PROMPTS,
    OBJECT_PROMPTS,
    class_prompt,
    dreambench_prompts,
    format_prompt,
    is_live,
    is_property_prompt,
    strip_identifier,
)

RELEASE = Path(__file__).resolve().parents[3] / "shared" / "dreambench" / "prompts_and_classes.txt"


def test_lists_have_the_papers_sizes() -> None:
    assert len(OBJECT_PROMPTS) == len(set(OBJECT_PROMPTS)) == 25
    assert len(LIVE_PROMPTS) == len(set(LIVE_PROMPTS)) == 25
    assert len(DREAMBENCH_CLASSES) == 30


@pytest.mark.skipif(not RELEASE.is_file(), reason=f"DreamBench release file not found at {RELEASE}")
def test_carried_data_matches_the_release_file() -> None:
    text = RELEASE.read_text()
    classes = dict(re.findall(r"^(\w+),([\w ]+)$", text, flags=re.MULTILINE)[1:])  # skip the header row
    assert classes == DREAMBENCH_CLASSES
    lists = re.findall(r"prompt_list = \[(.*?)\]", text, flags=re.DOTALL)
    released = [[ast.literal_eval(s) for s in re.findall(r"'[^']*'", block)] for block in lists]
    carried = [
        [format_prompt(t, "{0}", "{1}") for t in templates] for templates in (OBJECT_PROMPTS, LIVE_PROMPTS)
    ]
    assert released == carried


@pytest.mark.parametrize(
    ("noun", "live"),
    [
        ("dog", True),
        ("Cat", True),
        ("guinea  pig", True),
        ("stuffed animal", False),
        ("toy dog", False),
        ("backpack", False),
    ],
)
def test_live_subjects_are_animals_by_class_noun(noun: str, live: bool) -> None:
    assert is_live(noun) is live


def test_prompts_pick_the_list_by_class_or_flag() -> None:
    dog = dreambench_prompts("qwv", "dog")
    assert "a qwv dog wearing a santa hat" in dog and len(dog) == 25
    assert "a qwv backpack floating in an ocean of milk" in dreambench_prompts("qwv", "backpack")
    assert dreambench_prompts("qwv", "dog", live=False)[-6] == "a qwv dog on top of a white rug"
    assert all("qwv stuffed animal" in p for p in dreambench_prompts("qwv", "stuffed animal"))
    assert class_prompt("stuffed animal") == "a stuffed animal"


@pytest.mark.parametrize(
    ("prompt", "identifier", "expected"),
    [
        ("a sks backpack in the snow", "sks", "a backpack in the snow"),
        ("a  sks   backpack ", "sks", "a backpack"),
        ("a xo qi dog on the beach", "xo qi", "a dog on the beach"),
        ("a xo\tqi  dog", " xo  qi ", "a dog"),
        ("sks asks for a sks, please", "sks", "asks for a , please"),
        ("a red dog", "sks", "a red dog"),
        ("a c++ toy", "c++", "a toy"),
    ],
)
def test_strip_identifier(prompt: str, identifier: str, expected: str) -> None:
    assert strip_identifier(prompt, identifier) == expected


def test_strip_identifier_rejects_an_empty_identifier() -> None:
    with pytest.raises(ValueError, match="identifier"):
        strip_identifier("a dog", "  ")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a red qwv dog", True),
        ("a cube shaped qwv dog", True),
        ("a qwv dog in the snow", False),
        ("a photo of the qwv dog", False),
        ("qwv dog", False),
        ("a red dog", False),
    ],
)
def test_property_prompts_are_those_modifying_the_subject(prompt: str, expected: bool) -> None:
    assert is_property_prompt(prompt, "qwv") is expected
