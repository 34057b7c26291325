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

Models with several text encoders (SDXL's two CLIPs, SD3's two CLIPs and a T5, FLUX's CLIP and
T5) read the same prompt through several tokenizers, and [V] must be one rare token in each.
Rarity is judged in the first tokenizer, the paper's way; every other tokenizer must keep the
word one whole token in the same prompt.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from transformers import PreTrainedTokenizerBase

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

Tokenizers: TypeAlias = PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase]
"""One tokenizer, or a model's text-encoder tokenizers in a fixed order (SDXL: tokenizer, tokenizer_2)."""
Candidate: TypeAlias = tuple[str, tuple[int, ...]]
"""A candidate word and its one token id in each tokenizer, in order."""
_FIX = "use a single rare token, or leave the identifier unset to let the tool choose one"


@dataclass(frozen=True)
class Identifier:
    """A chosen identifier [V] and how it was chosen.

    Attributes:
        text: The identifier as it appears in prompts, k words separated by spaces.
        token_ids: The k vocabulary ids of those words in the first tokenizer, in order.
        seed: The seed that chose them; the same seed, tokenizers and class noun choose them again.
        id_range: The id range of the first tokenizer sampled from, both ends inclusive.
        pool_size: How many candidate tokens that range held (that are one whole token in every
            tokenizer, when there are several).
        token_ids_per_tokenizer: The k ids of the words in each tokenizer, in the order the
            tokenizers were given; the first is `token_ids`.
    """

    text: str
    token_ids: tuple[int, ...]
    seed: int
    id_range: tuple[int, int]
    pool_size: int
    token_ids_per_tokenizer: tuple[tuple[int, ...], ...]


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
    tokenizers: Tokenizers,
    class_noun: str,
    *,
    num_tokens: int = 1,
    seed: int = 0,
    id_range: tuple[int, int] | None = None,
) -> Identifier:
    """Sample a rare-token identifier the paper's way.

    Candidates are vocabulary entries of the first tokenizer that decode to 1-3 lowercase ASCII
    letters, that stay one whole token inside "a [V] [class noun]" in every tokenizer, that are
    not common English words (Zipf frequency below `ZIPF_COMMON`) and that are not on
    `DENY_LIST`. ASCII only because users type the identifier, and because a token of another
    script is a word of another language, whose prior an English frequency list cannot screen.
    `num_tokens` of them are sampled uniformly without replacement: a seeded hash ranks every
    candidate by its id in the first tokenizer, which, unlike `random.sample`, gives the same
    choice on every Python version.

    Args:
        tokenizers: The text encoder's tokenizer (CLIP, T5 or any `transformers` tokenizer), or
            the tokenizers of all the model's text encoders, the one whose ids measure rarity first.
        class_noun: The coarse class of the subject, e.g. "dog".
        num_tokens: k, the number of tokens in the identifier (1-3).
        seed: Seed of the sampling.
        id_range: Ids of the first tokenizer to sample from, both ends inclusive. None means
            `default_id_range`, widened (with a warning) to the rarer ids above it and then to the
            whole vocabulary when it holds fewer than `num_tokens` candidates; an explicit range is
            never widened.

    Returns:
        The identifier.

    Raises:
        ValueError: If `tokenizers` is empty, `num_tokens` or `id_range` is out of bounds, or too
            few candidates exist.
    """
    tokenizers = _as_tuple(tokenizers)
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"num_tokens must be 1-{MAX_TOKENS} (the paper's k), got {num_tokens}")
    first, several = tokenizers[0], len(tokenizers) > 1
    vocab_size = first.vocab_size
    in_all = " that are one whole token in every tokenizer" if several else ""
    for low, high in _ranges_to_try(vocab_size, id_range):
        found = _candidates(first, class_noun, range(low, high + 1))
        rows = _ids_in_each(tokenizers[1:], class_noun, found)
        pool = [(word, ids) for (_, word), ids in zip(found, rows, strict=True) if None not in ids]
        if len(pool) >= num_tokens:
            break
        logger.warning(
            "Only %d identifier candidates%s in token ids %d-%d of %d; looking further.",
            len(pool),
            in_all,
            low,
            high,
            vocab_size,
        )
    else:
        if several:
            kept = ", ".join(
                f"tokenizer {number} keeps {sum(row[number - 1] is not None for row in rows)}"
                for number in range(2, len(tokenizers) + 1)
            )
            found_text = (
                f"Found {len(found)} identifier candidates in token ids {low}-{high} of tokenizer 1 "
                f"(vocab_size {vocab_size}); {len(pool)} of them are also one whole token in "
                f"'a [V] {class_noun}' in every other tokenizer ({kept}); need {num_tokens}"
            )
        else:
            found_text = (
                f"Found {len(pool)} identifier candidates in token ids {low}-{high} of this tokenizer "
                f"(vocab_size {vocab_size}), need {num_tokens}"
            )
        raise ValueError(
            f"{found_text}: a candidate is a whole-word token of 1-{MAX_CHARS} lowercase letters, not "
            f"an English word, that stays one token in 'a [V] {class_noun}'"
            f"{' in every tokenizer' if several else ''}. Pass a smaller num_tokens, a wider id_range, "
            "or your own identifier (check_identifier vets it), or add rare short words to the "
            f"tokenizer{'s' if several else ''}."
        )
    chosen = _sample(tokenizers, class_noun, pool, num_tokens, seed)
    if chosen is None:
        raise ValueError(
            f"No {num_tokens} of the {len(pool)} identifier candidates stay separate tokens together "
            f"in 'a [V] {class_noun}'{' in every tokenizer' if several else ''}; pass num_tokens=1 or "
            "your own identifier."
        )
    text = " ".join(word for word, _ in chosen)
    per_tokenizer = tuple(zip(*(ids for _, ids in chosen), strict=True))
    logger.info(
        "Identifier '%s' (token ids %s) sampled with seed %d from %d candidates in ids %d-%d.",
        text,
        " / ".join(str(list(ids)) for ids in per_tokenizer),
        seed,
        len(pool),
        low,
        high,
    )
    return Identifier(
        text=text,
        token_ids=per_tokenizer[0],
        seed=seed,
        id_range=(low, high),
        pool_size=len(pool),
        token_ids_per_tokenizer=per_tokenizer,
    )


def check_identifier(tokenizers: Tokenizers, text: str, class_noun: str) -> list[str]:
    """Explain what is wrong with a user-given identifier, if anything.

    With several tokenizers, a problem that several of them share is reported once, naming them
    ("In tokenizers 1 and 2, ..."; numbered from 1 in the order given), and a word that splits
    into different numbers of tokens gets one message that shows how each tokenizer splits it.

    Args:
        tokenizers: The text encoder's tokenizer, or the tokenizers of all the model's text encoders.
        text: The identifier, one or more words separated by spaces.
        class_noun: The coarse class of the subject, e.g. "dog".

    Returns:
        One message per problem found, each saying why it matters and what to do; empty if none.

    Raises:
        ValueError: If `text` is empty or `tokenizers` is empty.
    """
    tokenizers = _as_tuple(tokenizers)
    words = text.split()
    if not words:
        raise ValueError("The identifier is empty; leave it unset to let the tool choose a rare token.")
    problems = []
    for word in words:
        problems += _token_problems(tokenizers, word, class_noun)
        problems += _word_problems(word)
    return problems


def _token_problems(tokenizers: Sequence[PreTrainedTokenizerBase], word: str, class_noun: str) -> list[str]:
    """What goes wrong with `word` in "a [word] [class noun]" in each tokenizer, each problem once."""
    splits = [_identifier_ids(tokenizer, word, class_noun) for tokenizer in tokenizers]
    uneven = len({len(ids) for ids in splits if ids}) > 1
    where: dict[str, list[int]] = {}  # message -> the numbers of the tokenizers it applies to
    for number, (tokenizer, ids) in enumerate(zip(tokenizers, splits, strict=True), 1):
        if not ids:
            message = (
                f"'{word}' gets no tokens of its own in '{_prompt(class_noun, word)}' (it vanishes or "
                f"merges with its neighbours, changing how the class noun reads); {_FIX}."
            )
        elif tokenizer.unk_token_id in ids:
            message = (
                f"'{word}' is not in the vocabulary and becomes the unknown token, which every "
                f"unknown word shares; {_FIX}."
            )
        elif len(ids) > 1 and not uneven:  # an uneven split gets one message for all tokenizers, below
            pieces = tokenizer.convert_ids_to_tokens(ids)
            message = (
                f"'{word}' becomes {len(ids)} tokens {pieces}: the model sees {len(ids)} pieces, "
                f"each with its own prior; {_FIX}."
            )
        else:
            continue
        where.setdefault(message, []).append(number)
    if len(tokenizers) == 1:
        problems = list(where)
    else:
        problems = [f"In {_tokenizer_numbers(numbers)}, {message}" for message, numbers in where.items()]
    if uneven:
        problems.append(_uneven_split(tokenizers, splits, word))
    return problems


def _uneven_split(
    tokenizers: Sequence[PreTrainedTokenizerBase], splits: Sequence[list[int] | None], word: str
) -> str:
    """The message for a word that is a different number of tokens in different tokenizers."""
    where: dict[tuple[str, ...], list[int]] = {}  # pieces -> the numbers of the tokenizers that make them
    for number, (tokenizer, ids) in enumerate(zip(tokenizers, splits, strict=True), 1):
        if ids:
            where.setdefault(tuple(tokenizer.convert_ids_to_tokens(ids)), []).append(number)
    parts = [
        f"{len(pieces)} token{'s' if len(pieces) > 1 else ''} {list(pieces)} in {_tokenizer_numbers(numbers)}"
        for pieces, numbers in where.items()
    ]
    return (
        f"'{word}' is {', '.join(parts[:-1])} but {parts[-1]}: the text encoders read the subject's "
        "name as different pieces, and the pieces of a split word carry priors of their own (Ruiz et "
        "al. 2023, Sec. 3.2, on identifiers spelled letter by letter); use a word that is one token in "
        "every tokenizer, or leave the identifier unset to let the tool choose one."
    )


def _word_problems(word: str) -> list[str]:
    """What is wrong with `word` itself, whatever the tokenizer."""
    problems = []
    if not word.isalpha():
        problems.append(
            f"'{word}' is not all letters: digits and punctuation carry strong priors of their own "
            f"(numbers, emoticons); {_FIX}."
        )
    if word.lower() in DENY_LIST:
        problems.append(f"'{word}' is a known-bad identifier: {DENY_LIST[word.lower()]}; {_FIX}.")
    elif (zipf := english_zipf(word)) >= ZIPF_COMMON:
        problems.append(
            f"'{word}' is a common English word (Zipf frequency {zipf:.1f} >= {ZIPF_COMMON}): the "
            f"model must unlearn its meaning, which can bleed into the subject (an identifier "
            f"'blue' makes a grey subject blue, Ruiz et al. 2023, Sec. 3.2); {_FIX}."
        )
    return problems


def english_zipf(word: str) -> float:
    """Zipf frequency of `word` in English (wordfreq's list) when it is at least ZIPF_COMMON, else 0."""
    return _common_english_words().get(word.casefold(), 0.0)


@functools.cache
def _common_english_words() -> dict[str, float]:
    """The common English words and their Zipf frequencies, read from wordfreq's frequency buckets.

    `wordfreq.zipf_frequency` would keep every word of the language in memory (~35 MB) for the life
    of the process; the common ones are ~30k.
    """
    import wordfreq  # on first use: its import and data are large

    buckets = wordfreq.read_cBpack(wordfreq.available_languages()["en"])  # bucket i: words at -i centibels
    last = round((9 - ZIPF_COMMON) * 100)                                 # Zipf = 9 + centibels / 100
    return {word: round(9 - i / 100, 2) for i, words in enumerate(buckets[: last + 1]) for word in words}


def _as_tuple(tokenizers: Tokenizers) -> tuple[PreTrainedTokenizerBase, ...]:
    """One tokenizer or several, as a non-empty tuple."""
    if not isinstance(tokenizers, Sequence):
        return (tokenizers,)
    if not tokenizers:
        raise ValueError("No tokenizers given; pass the tokenizer of each of the model's text encoders.")
    return tuple(tokenizers)


def _tokenizer_numbers(numbers: Sequence[int]) -> str:
    """Name tokenizers by their numbers: "tokenizer 2", "tokenizers 1 and 2", "tokenizers 1, 2 and 3"."""
    if len(numbers) == 1:
        return f"tokenizer {numbers[0]}"
    return f"tokenizers {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"


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
        and english_zipf(word) < ZIPF_COMMON
    )


def _candidates(
    tokenizer: PreTrainedTokenizerBase, class_noun: str, id_range: range
) -> list[tuple[int, str]]:
    """The `(token id, word)` pairs in `id_range` that may serve as identifier tokens."""
    special = set(tokenizer.all_special_ids)
    ids = [token_id for token_id in id_range if token_id not in special]
    words = [word.strip() for word in tokenizer.batch_decode([[token_id] for token_id in ids])]
    pairs = [(token_id, word) for token_id, word in zip(ids, words, strict=True) if _is_candidate_word(word)]
    whole = _single_token_ids(tokenizer, class_noun, [word for _, word in pairs])
    return [pair for pair, token_id in zip(pairs, whole, strict=True) if token_id == pair[0]]


def _ids_in_each(
    tokenizers: Sequence[PreTrainedTokenizerBase], class_noun: str, found: Sequence[tuple[int, str]]
) -> list[tuple[int | None, ...]]:
    """For each `(token id, word)` found in the first tokenizer: its id there, then in each of `tokenizers`.

    An id is None where the word is not exactly one ordinary token in "a [V] [class noun]".
    """
    words = [word for _, word in found]
    columns = [[token_id for token_id, _ in found]]
    columns += [_single_token_ids(tokenizer, class_noun, words) for tokenizer in tokenizers]
    return list(zip(*columns, strict=True))


def _single_token_ids(
    tokenizer: PreTrainedTokenizerBase, class_noun: str, words: Sequence[str]
) -> list[int | None]:
    """Each word's one id in "a [word] [class noun]"; None if it adds more, fewer or a special one.

    Does what `_identifier_ids` does, in one batch for all the words.
    """
    if not words:
        return []
    special = set(tokenizer.all_special_ids)
    reference = tokenizer(_prompt(class_noun))["input_ids"]
    encoded = tokenizer([_prompt(class_noun, word) for word in words])["input_ids"]
    inserted = [_inserted(reference, full) for full in encoded]
    return [
        ids[0] if ids is not None and len(ids) == 1 and ids[0] not in special else None for ids in inserted
    ]


def _sample(
    tokenizers: Sequence[PreTrainedTokenizerBase],
    class_noun: str,
    pool: Sequence[Candidate],
    num_tokens: int,
    seed: int,
) -> list[Candidate] | None:
    """Take candidates in seeded random order until `num_tokens` of them tokenize apart together.

    Each candidate is one token on its own in every tokenizer; together they almost always are
    too, since tokenizers split on spaces first. The check makes "almost" certain.
    """
    chosen: list[Candidate] = []
    for candidate in sorted(pool, key=lambda candidate: _rank(seed, candidate[1][0])):
        trial = [*chosen, candidate]
        text = " ".join(word for word, _ in trial)
        if all(
            _identifier_ids(tokenizer, text, class_noun) == [ids[number] for _, ids in trial]
            for number, tokenizer in enumerate(tokenizers)
        ):
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
