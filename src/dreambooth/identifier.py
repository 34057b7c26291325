"""Rare-token identifiers [V] for "a [V] [class noun]" (Ruiz et al. 2023, Sec. 3.2).

The paper finds relatively rare tokens in the tokenizer's vocabulary and inverts them into
text: "uniform random sampling without replacement of tokens that correspond to 3 or fewer
Unicode characters (without spaces) and using tokens in the T5-XXL tokenizer range of
{5000, ..., 10000}", k = 1..3 of them.

Whole-word tokens are found by behaviour, not by tokenizer class or vocabulary markers
(CLIP's `</w>`, sentencepiece's `▁`, byte-level BPE's `Ġ`, none in a word-level vocabulary):
a token qualifies when its decoded text, placed in the prompt "a [V] [class noun]", encodes
back to exactly that one token and leaves the rest of the prompt as it was. The same test
serves every convention and checks what matters, the prompt the model will be trained on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase
from wordfreq import zipf_frequency

logger = logging.getLogger(__name__)

T5_VOCAB_SIZE = 32100
"""Size of the T5-XXL vocabulary (32000 sentencepiece pieces + 100 sentinels)."""
T5_RARE_RANGE = (5000, 10000)
"""The paper's rare id range in the T5-XXL tokenizer, both ends inclusive."""
MAX_CHARS = 3
"""Longest identifier token, in characters (the paper's "3 or fewer")."""
MAX_TOKENS = 3
"""Largest k; the paper finds k = 1..3 works well."""
ZIPF_COMMON = 3.0
"""Zipf frequency (log10 of uses per billion words) from which a word counts as common English.

3.0 is once per million words. In CLIP's vocabulary, within the scaled default range, it keeps
about 200 of the 700 short whole-word tokens and removes words such as "rum", "mug" and "hug"
while keeping fragments such as "zia" or "ori". Every single letter scores 4.4 or more, so it
also keeps out the letters whose strong priors the paper warns about."""

_COMMUNITY_DEFAULT = (
    "it is a community default, so checkpoints merged from shared fine-tunes may already tie it to "
    "another subject"
)
_STYLE_TAG = "it is a file-format or quality tag of scraped captions and steers the image style"
DENY_LIST: dict[str, str] = {
    # Community habits that the frequency test lets through.
    "sks": "it is a rifle (the SKS carbine) and Stable Diffusion draws guns for it",
    "ohwx": _COMMUNITY_DEFAULT,
    "zwx": _COMMUNITY_DEFAULT,
    **dict.fromkeys(["jpg", "svg", "uhd"], _STYLE_TAG),
    **dict.fromkeys(("nig", "jap", "spic", "kike", "wop"), "it is a slur"),
    **dict.fromkeys(
        ("fck", "fuk", "fap", "kys", "thot", "cuck", "loli", "jav", "milf"), "it is sexual or abusive slang"
    ),
}
"""Known-bad identifiers, each with the reason shown to a user who picks it."""


@dataclass(frozen=True)
class Identifier:
    """A chosen identifier [V] and how it was chosen.

    Attributes:
        text: The identifier as it appears in prompts, k words separated by spaces.
        token_ids: The k vocabulary ids of those words, in order.
        seed: The seed that chose them; the same seed, tokenizer and class noun choose them again.
        id_range: The id range sampled from, both ends inclusive.
        pool_size: How many candidate tokens that range held.
    """

    text: str
    token_ids: tuple[int, ...]
    seed: int
    id_range: tuple[int, int]
    pool_size: int


def default_id_range(vocab_size: int) -> tuple[int, int]:
    """Scale the paper's T5-XXL range {5000, ..., 10000} to a vocabulary of `vocab_size`.

    Sentencepiece orders ids by piece score and BPE by merge order, both roughly by frequency,
    so a token's relative position in the vocabulary is a proxy for its rarity. The paper's
    range is the 16th-31st percentile of T5's ids: rare, but not the tail, whose embeddings saw
    little training. Scaling keeps that band, e.g. ids 7696-15392 of CLIP's 49408.

    Args:
        vocab_size: Number of ids in the base vocabulary.

    Returns:
        `(low, high)`, both inclusive.
    """
    low, high = (round(bound * vocab_size / T5_VOCAB_SIZE) for bound in T5_RARE_RANGE)
    return low, min(high, vocab_size - 1)


def choose_identifier(
    tokenizer: PreTrainedTokenizerBase,
    class_noun: str,
    *,
    num_tokens: int = 1,
    seed: int = 0,
    id_range: tuple[int, int] | None = None,
) -> Identifier:
    """Sample a rare-token identifier the paper's way.

    Candidates are vocabulary entries that decode to 1-3 lowercase ASCII letters, that stay
    one whole token inside "a [V] [class noun]", that are not common English words (Zipf
    frequency below `ZIPF_COMMON`) and that are not on `DENY_LIST`. ASCII only because users
    type the identifier, and because a token of another script is a word of another language,
    whose prior an English frequency list cannot screen. `num_tokens` of them are sampled
    uniformly without replacement: a seeded hash ranks every candidate, which, unlike
    `random.sample`, gives the same choice on every Python version.

    Args:
        tokenizer: The text encoder's tokenizer (CLIP, T5 or any `transformers` tokenizer).
        class_noun: The coarse class of the subject, e.g. "dog".
        num_tokens: k, the number of tokens in the identifier (1-3).
        seed: Seed of the sampling.
        id_range: Ids to sample from, both ends inclusive. None means `default_id_range`, widened
            (with a warning) to the rarer ids above it and then to the whole vocabulary when it
            holds fewer than `num_tokens` candidates; an explicit range is never widened.

    Returns:
        The identifier.

    Raises:
        ValueError: If `num_tokens` or `id_range` is out of bounds, or too few candidates exist.
    """
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"num_tokens must be 1-{MAX_TOKENS} (the paper's k), got {num_tokens}")
    vocab_size = tokenizer.vocab_size
    for low, high in _ranges_to_try(vocab_size, id_range):
        pool = _candidates(tokenizer, class_noun, range(low, high + 1))
        if len(pool) >= num_tokens:
            break
        logger.warning(
            "Only %d identifier candidates in token ids %d-%d of %d; looking further.",
            len(pool),
            low,
            high,
            vocab_size,
        )
    else:
        raise ValueError(
            f"Found {len(pool)} identifier candidates in token ids {low}-{high} of this tokenizer "
            f"(vocab_size {vocab_size}), need {num_tokens}: a candidate is a whole-word token of "
            f"1-{MAX_CHARS} lowercase letters, not an English word, that stays one token in "
            f"'a [V] {class_noun}'. Pass a smaller num_tokens, a wider id_range, or your own "
            "identifier (check_identifier vets it), or add rare short words to the tokenizer."
        )
    chosen = _sample(tokenizer, class_noun, pool, num_tokens, seed)
    if chosen is None:
        raise ValueError(
            f"No {num_tokens} of the {len(pool)} identifier candidates stay separate tokens together "
            f"in 'a [V] {class_noun}'; pass num_tokens=1 or your own identifier."
        )
    text = " ".join(word for _, word in chosen)
    logger.info(
        "Identifier '%s' (token ids %s) sampled with seed %d from %d candidates in ids %d-%d.",
        text,
        [token_id for token_id, _ in chosen],
        seed,
        len(pool),
        low,
        high,
    )
    return Identifier(
        text=text,
        token_ids=tuple(token_id for token_id, _ in chosen),
        seed=seed,
        id_range=(low, high),
        pool_size=len(pool),
    )


def check_identifier(tokenizer: PreTrainedTokenizerBase, text: str, class_noun: str) -> list[str]:
    """Explain what is wrong with a user-given identifier, if anything.

    Args:
        tokenizer: The text encoder's tokenizer.
        text: The identifier, one or more words separated by spaces.
        class_noun: The coarse class of the subject, e.g. "dog".

    Returns:
        One message per problem found, each saying why it matters and what to do; empty if none.

    Raises:
        ValueError: If `text` is empty.
    """
    words = text.split()
    if not words:
        raise ValueError("The identifier is empty; leave it unset to let the tool choose a rare token.")
    fix = "use a single rare token, or leave the identifier unset to let the tool choose one"
    problems = []
    for word in words:
        ids = _identifier_ids(tokenizer, word, class_noun)
        if not ids:
            problems.append(
                f"'{word}' gets no tokens of its own in '{_prompt(class_noun, word)}' (it vanishes or "
                f"merges with its neighbours, changing how the class noun reads); {fix}."
            )
        elif tokenizer.unk_token_id in ids:
            problems.append(
                f"'{word}' is not in the vocabulary and becomes the unknown token, which every "
                f"unknown word shares; {fix}."
            )
        elif len(ids) > 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            problems.append(
                f"'{word}' becomes {len(ids)} tokens {pieces}: the model sees {len(ids)} pieces, "
                f"each with its own prior; {fix}."
            )
        if not word.isalpha():
            problems.append(
                f"'{word}' is not all letters: digits and punctuation carry strong priors of their own "
                f"(numbers, emoticons); {fix}."
            )
        if word.lower() in DENY_LIST:
            problems.append(f"'{word}' is a known-bad identifier: {DENY_LIST[word.lower()]}; {fix}.")
        elif (zipf := zipf_frequency(word, "en")) >= ZIPF_COMMON:
            problems.append(
                f"'{word}' is a common English word (Zipf frequency {zipf:.1f} >= {ZIPF_COMMON}): the "
                f"model must unlearn its meaning, which can bleed into the subject (an identifier "
                f"'blue' makes a grey subject blue, Ruiz et al. 2023, Sec. 3.2); {fix}."
            )
    return problems


def _prompt(class_noun: str, identifier: str = "") -> str:
    """The paper's instance prompt "a [V] [class noun]", or "a [class noun]" without identifier."""
    return " ".join(part for part in ("a", identifier, class_noun) if part)


def _ranges_to_try(vocab_size: int, id_range: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The id ranges to search in turn: the explicit one, or the default widened twice."""
    if id_range is not None:
        low, high = id_range
        if not 0 <= low <= high < vocab_size:
            raise ValueError(f"id_range must satisfy 0 <= low <= high < {vocab_size}, got {id_range}")
        return [id_range]
    low, high = default_id_range(vocab_size)
    return list(dict.fromkeys([(low, high), (low, vocab_size - 1), (0, vocab_size - 1)]))


def _is_candidate_word(word: str) -> bool:
    """Whether a decoded token is short, lowercase letters, uncommon in English and not denied."""
    return (
        0 < len(word) <= MAX_CHARS
        and word.isascii()
        and word.isalpha()
        and word.islower()
        and word not in DENY_LIST
        and zipf_frequency(word, "en") < ZIPF_COMMON
    )


def _candidates(
    tokenizer: PreTrainedTokenizerBase, class_noun: str, id_range: range
) -> list[tuple[int, str]]:
    """The `(token id, word)` pairs in `id_range` that may serve as identifier tokens.

    Does what `_identifier_ids` does, in one batch for the whole range.
    """
    special = set(tokenizer.all_special_ids)
    ids = [token_id for token_id in id_range if token_id not in special]
    words = [word.strip() for word in tokenizer.batch_decode([[token_id] for token_id in ids])]
    pairs = [(token_id, word) for token_id, word in zip(ids, words, strict=True) if _is_candidate_word(word)]
    if not pairs:
        return []
    reference = tokenizer(_prompt(class_noun))["input_ids"]
    encoded = tokenizer([_prompt(class_noun, word) for _, word in pairs])["input_ids"]
    return [
        pair for pair, full in zip(pairs, encoded, strict=True) if _inserted(reference, full) == [pair[0]]
    ]


def _sample(
    tokenizer: PreTrainedTokenizerBase,
    class_noun: str,
    pool: Sequence[tuple[int, str]],
    num_tokens: int,
    seed: int,
) -> list[tuple[int, str]] | None:
    """Take candidates in seeded random order until `num_tokens` of them tokenize apart together.

    Each candidate is one token on its own; together they almost always are too, since
    tokenizers split on spaces first. The check makes "almost" certain.
    """
    chosen: list[tuple[int, str]] = []
    for token_id, word in sorted(pool, key=lambda pair: _rank(seed, pair[0])):
        trial = [*chosen, (token_id, word)]
        ids = _identifier_ids(tokenizer, " ".join(w for _, w in trial), class_noun)
        if ids == [i for i, _ in trial]:
            chosen = trial
        if len(chosen) == num_tokens:
            return chosen
    return None


def _rank(seed: int, token_id: int) -> bytes:
    """A seeded pseudo-random sort key, independent for every token and stable across versions."""
    return hashlib.sha256(f"{seed}:{token_id}".encode()).digest()


def _identifier_ids(tokenizer: PreTrainedTokenizerBase, text: str, class_noun: str) -> list[int] | None:
    """The ids that `text` contributes to "a [text] [class noun]", or None if it changes the rest."""
    reference = tokenizer(_prompt(class_noun))["input_ids"]
    return _inserted(reference, tokenizer(_prompt(class_noun, text))["input_ids"])


def _inserted(reference: list[int], full: list[int]) -> list[int] | None:
    """The ids inserted into `reference` to make `full`, or None if `full` changed `reference` too.

    Args:
        reference: Ids of the prompt without the identifier, e.g. "a dog".
        full: Ids of the prompt with it, e.g. "a [V] dog".

    Returns:
        `full` less the longest prefix and suffix that it shares with `reference`, provided those
        two make up all of `reference`; else None.
    """
    prefix = 0
    while prefix < min(len(reference), len(full)) and reference[prefix] == full[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(reference), len(full)) - prefix and reference[-1 - suffix] == full[-1 - suffix]:
        suffix += 1
    if prefix + suffix != len(reference):
        return None
    return full[prefix : len(full) - suffix]
