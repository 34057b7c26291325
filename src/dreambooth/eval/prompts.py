"""DreamBench: the paper's evaluation prompts and subject classes, and identifier handling.

Carried from the DreamBench release (``prompts_and_classes.txt``, Ruiz et al. 2023): 30
subjects with their class nouns, 25 prompts for objects and 25 for live subjects (dogs and
cats). The prompts fall into the paper's categories: recontextualisation (first 20 object /
first 10 live), accessorisation (live 11-20) and property modification (last 5 of both).

Choices the paper leaves open:

- *Object or live list.* DreamBench's live subjects are its dogs and cats. For other class
  nouns we call a subject live when its class noun is one of :data:`LIVE_CLASS_NOUNS` (common
  animals and people), matched on the whole lower-cased noun, so "stuffed animal" and
  "toy dog" stay objects; pass ``live=`` to override.
- *Stripping the identifier* (for CLIP-T, which must not see the rare token) removes the
  identifier where it stands as whole words, whatever the spacing between its tokens, and
  collapses the whitespace left behind: "a sks  backpack" -> "a backpack".
"""

from __future__ import annotations

import re

IDENTIFIER = "{identifier}"
CLASS_NOUN = "{class_noun}"

DREAMBENCH_CLASSES: dict[str, str] = {
    "backpack": "backpack",
    "backpack_dog": "backpack",
    "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl",
    "can": "can",
    "candle": "candle",
    "cat": "cat",
    "cat2": "cat",
    "clock": "clock",
    "colorful_sneaker": "sneaker",
    "dog": "dog",
    "dog2": "dog",
    "dog3": "dog",
    "dog5": "dog",
    "dog6": "dog",
    "dog7": "dog",
    "dog8": "dog",
    "duck_toy": "toy",
    "fancy_boot": "boot",
    "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy",
    "pink_sunglasses": "glasses",
    "poop_emoji": "toy",
    "rc_car": "toy",
    "red_cartoon": "cartoon",
    "robot_toy": "toy",
    "shiny_sneaker": "sneaker",
    "teapot": "teapot",
    "vase": "vase",
    "wolf_plushie": "stuffed animal",
}
"""DreamBench subject folder name -> class noun."""

_SUBJECT = f"{IDENTIFIER} {CLASS_NOUN}"
_SHARED_CONTEXTS = (
    f"a {_SUBJECT} in the jungle",
    f"a {_SUBJECT} in the snow",
    f"a {_SUBJECT} on the beach",
    f"a {_SUBJECT} on a cobblestone street",
    f"a {_SUBJECT} on top of pink fabric",
    f"a {_SUBJECT} on top of a wooden floor",
    f"a {_SUBJECT} with a city in the background",
    f"a {_SUBJECT} with a mountain in the background",
    f"a {_SUBJECT} with a blue house in the background",
    f"a {_SUBJECT} on top of a purple rug in a forest",
)
_PROPERTIES = (
    f"a red {_SUBJECT}",
    f"a purple {_SUBJECT}",
    f"a shiny {_SUBJECT}",
    f"a wet {_SUBJECT}",
    f"a cube shaped {_SUBJECT}",
)

OBJECT_PROMPTS: tuple[str, ...] = (
    *_SHARED_CONTEXTS,
    f"a {_SUBJECT} with a wheat field in the background",
    f"a {_SUBJECT} with a tree and autumn leaves in the background",
    f"a {_SUBJECT} with the Eiffel Tower in the background",
    f"a {_SUBJECT} floating on top of water",
    f"a {_SUBJECT} floating in an ocean of milk",
    f"a {_SUBJECT} on top of green grass with sunflowers around it",
    f"a {_SUBJECT} on top of a mirror",
    f"a {_SUBJECT} on top of the sidewalk in a crowded street",
    f"a {_SUBJECT} on top of a dirt road",
    f"a {_SUBJECT} on top of a white rug",
    *_PROPERTIES,
)
"""The 25 DreamBench object prompt templates (placeholders ``{identifier}`` and ``{class_noun}``)."""

LIVE_PROMPTS: tuple[str, ...] = (
    *_SHARED_CONTEXTS,
    f"a {_SUBJECT} wearing a red hat",
    f"a {_SUBJECT} wearing a santa hat",
    f"a {_SUBJECT} wearing a rainbow scarf",
    f"a {_SUBJECT} wearing a black top hat and a monocle",
    f"a {_SUBJECT} in a chef outfit",
    f"a {_SUBJECT} in a firefighter outfit",
    f"a {_SUBJECT} in a police outfit",
    f"a {_SUBJECT} wearing pink glasses",
    f"a {_SUBJECT} wearing a yellow shirt",
    f"a {_SUBJECT} in a purple wizard outfit",
    *_PROPERTIES,
)
"""The 25 DreamBench live-subject prompt templates."""

LIVE_CLASS_NOUNS = frozenset(
    {
        "dog", "puppy", "cat", "kitten", "bird", "parrot", "horse", "pony", "rabbit", "bunny", "hamster",
        "guinea pig", "ferret", "fox", "wolf", "cow", "pig", "sheep", "goat", "lion", "tiger", "bear",
        "panda", "monkey", "turtle", "tortoise", "lizard", "snake", "fish", "duck", "chicken", "owl",
        "person", "man", "woman", "boy", "girl", "baby", "child",
    }
)  # fmt: skip
"""Class nouns of live subjects (animals, people): they get the live prompt list."""

# Words that may stand right before the identifier without changing the subject's appearance
# ("a [V] dog", "a photo of the [V] dog"); any other word there is a property edit ("a red [V] dog").
_NEUTRAL_BEFORE_IDENTIFIER = frozenset(
    {"a", "an", "the", "of", "my", "our", "your", "this", "that", "photo", "picture", "image"}
)


def format_prompt(template: str, identifier: str, class_noun: str) -> str:
    """Fill a prompt template's ``{identifier}`` and ``{class_noun}`` placeholders.

    Args:
        template: A template such as ``"a {identifier} {class_noun} in the snow"``.
        identifier: The subject's rare-token identifier, e.g. ``"qwv"``.
        class_noun: The subject's class noun, e.g. ``"backpack"``.

    Returns:
        The prompt, e.g. ``"a qwv backpack in the snow"``.
    """
    return template.replace(IDENTIFIER, identifier).replace(CLASS_NOUN, class_noun)


def is_live(class_noun: str) -> bool:
    """Whether a class noun names a live subject (gets :data:`LIVE_PROMPTS`)."""
    return " ".join(class_noun.lower().split()) in LIVE_CLASS_NOUNS


def dreambench_prompts(identifier: str, class_noun: str, live: bool | None = None) -> list[str]:
    """The 25 DreamBench prompts for one subject.

    Args:
        identifier: The subject's identifier.
        class_noun: The subject's class noun.
        live: Use the live-subject list (True) or the object list (False); None decides from
            the class noun with :func:`is_live`.

    Returns:
        The 25 prompts, each containing the identifier followed by the class noun.
    """
    templates = LIVE_PROMPTS if (is_live(class_noun) if live is None else live) else OBJECT_PROMPTS
    return [format_prompt(t, identifier, class_noun) for t in templates]


def class_prompt(class_noun: str) -> str:
    """The prior-preservation prompt "a [class noun]" (Sec. 3.3), used for PRES."""
    return f"a {class_noun}"


def _identifier_pattern(identifier: str) -> re.Pattern[str]:
    words = identifier.split()
    if not words:
        raise ValueError(f"identifier must contain a non-space character, got {identifier!r}")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)")


def strip_identifier(prompt: str, identifier: str) -> str:
    """Remove the identifier from a prompt, as CLIP-T requires.

    Args:
        prompt: A prompt such as ``"a sks  backpack in the snow"``.
        identifier: The identifier; a multi-token one ("xo qi") matches with any spacing.

    Returns:
        The prompt without the identifier and with single spaces: ``"a backpack in the snow"``.
        A prompt without the identifier comes back with its whitespace normalised only.

    Raises:
        ValueError: If ``identifier`` is empty or only whitespace.
    """
    return " ".join(_identifier_pattern(identifier).sub(" ", prompt).split())


def is_property_prompt(prompt: str, identifier: str) -> bool:
    """Whether a prompt edits the subject's own appearance ("a red [V] dog").

    The rule: the word right before the identifier is a modifier rather than an article or
    "photo of". Context-appearance entanglement is not checked on such prompts, since there
    a change of the subject's colour is what was asked for.

    Args:
        prompt: A prompt containing the identifier.
        identifier: The identifier.

    Returns:
        True for property-modification prompts; False otherwise, also when the identifier is
        absent.
    """
    match = _identifier_pattern(identifier).search(prompt)
    if match is None:
        return False
    before = re.findall(r"\w+", prompt[: match.start()].lower())
    return bool(before) and before[-1] not in _NEUTRAL_BEFORE_IDENTIFIER
