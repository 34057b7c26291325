"""Tests for rare-token identifier selection, on small tokenizers of every convention built offline."""

from __future__ import annotations

import itertools
import json
import logging
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, T5Tokenizer
from wordfreq import zipf_frequency

from dreambooth.identifier import (
    DENY_LIST,
    ZIPF_COMMON,
    check_identifier,
    choose_identifier,
    default_id_range,
    english_zipf,
)

from tiny_models import tiny_clip_tokenizer

COMMON = ["dog", "cat", "the", "blue", "red", "on", "beach", "in", "of", "and", "with", "photo", "green",
          "cube", "toy", "bag", "teddy", "bear", "sks"]  # fmt: skip
RARE = ["zyk", "qoz", "vup", "jix", "wuq", "gux", "quv", "yix"]  # all Zipf 0.0


def build_clip_tokenizer(folder: Path, entries: list[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer saved in CLIP's format: a-z, a-z</w>, then `entries` in order.

    An entry ending in "</w>" is a whole word; any other entry is a word-initial or inner piece.
    Each entry gets a left-to-right chain of merges; intermediate symbols enter the vocabulary
    just before it.
    """
    vocab = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges: list[str] = []
    for entry in entries:
        core, suffix = (entry[:-4], "</w>") if entry.endswith("</w>") else (entry, "")
        symbols = [*core[:-1], core[-1] + suffix]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if merged + symbol not in vocab:
                merges.append(f"{merged} {symbol}")
                vocab.append(merged + symbol)
            merged += symbol
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_t5_tokenizer() -> T5Tokenizer:
    """A sentencepiece-style unigram tokenizer: word-initial pieces start with "▁"."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -10.0) for c in string.ascii_lowercase]
    pieces += [("▁a", -1.0)] + [(f"▁{word}", -3.0) for word in COMMON + RARE]
    pieces += [("fep", -3.0), ("zo", -3.0)]  # inner pieces: never identifiers on their own
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)


def build_word_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer, as a small project-trained text encoder may use."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "a", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def build_byte_level_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE trained on the spot: word-initial tokens start with "Ġ"."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"a {rare} {word} on the beach with a photo" for rare in RARE for word in COMMON] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    entries = [word + "</w>" for word in COMMON + RARE] + ["qo", "fep"]
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip"), entries)


@pytest.fixture(scope="module", params=["clip", "t5", "word_level", "byte_level_bpe"])
def tokenizer(request: pytest.FixtureRequest, clip: CLIPTokenizer) -> PreTrainedTokenizerBase:
    builders = {
        "clip": lambda: clip,
        "t5": build_t5_tokenizer,
        "word_level": lambda: build_word_level_tokenizer(COMMON + RARE),
        "byte_level_bpe": build_byte_level_bpe_tokenizer,
    }
    return builders[request.param]()


def ids_of(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_default_range_scales_the_t5_range() -> None:
    assert default_id_range(32100) == (5000, 10000)
    assert default_id_range(49408) == (7696, 15392)  # CLIP
    assert default_id_range(10) == (2, 3)


def test_chosen_identifier_is_one_rare_word_inside_the_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    identifier = choose_identifier(tokenizer, "dog")
    (token_id,) = identifier.token_ids
    low, high = identifier.id_range
    assert low <= token_id <= high
    assert identifier.pool_size >= 1
    assert identifier.text in RARE
    assert len(identifier.text) <= 3 and identifier.text.isalpha()
    assert zipf_frequency(identifier.text, "en") < ZIPF_COMMON
    # "a [V] dog" is "a dog" with exactly the identifier's token inserted.
    reference, prompt = ids_of(tokenizer, "a dog"), ids_of(tokenizer, f"a {identifier.text} dog")
    position = prompt.index(token_id)
    assert prompt[:position] + prompt[position + 1 :] == reference
    assert check_identifier(tokenizer, identifier.text, "dog") == []


def test_default_range_is_used_when_it_has_candidates() -> None:
    # 30 ids: the default range is ids 5-9, which hold three rare words and two common ones.
    tokenizer = build_word_level_tokenizer(COMMON[:2] + RARE[:3] + COMMON[2:] + RARE[3:])
    assert default_id_range(tokenizer.vocab_size) == (5, 9)
    identifiers = [choose_identifier(tokenizer, "dog", seed=seed) for seed in range(5)]
    assert {identifier.id_range for identifier in identifiers} == {(5, 9)}
    assert {identifier.pool_size for identifier in identifiers} == {3}
    assert {identifier.text for identifier in identifiers} <= set(RARE[:3])


def test_seed_reproduces_the_choice_and_other_seeds_differ(tokenizer: PreTrainedTokenizerBase) -> None:
    first = choose_identifier(tokenizer, "dog", seed=3)
    assert choose_identifier(tokenizer, "dog", seed=3) == first
    assert first.seed == 3
    texts = {
        choose_identifier(tokenizer, "dog", seed=seed, id_range=first.id_range).text for seed in range(8)
    }
    assert len(texts) > 1


@pytest.mark.parametrize("num_tokens", [2, 3])
def test_k_tokens_are_distinct_single_tokens(tokenizer: PreTrainedTokenizerBase, num_tokens: int) -> None:
    vocab_size = tokenizer.vocab_size
    identifier = choose_identifier(
        tokenizer, "teddy bear", num_tokens=num_tokens, id_range=(0, vocab_size - 1)
    )
    words = identifier.text.split()
    assert len(words) == len(set(identifier.token_ids)) == num_tokens
    prompt = ids_of(tokenizer, f"a {identifier.text} teddy bear")
    assert all(prompt.count(token_id) == 1 for token_id in identifier.token_ids)
    assert check_identifier(tokenizer, identifier.text, "teddy bear") == []


def test_bad_tokens_are_never_chosen(tmp_path: Path) -> None:
    # Only "zyk" qualifies: the others are denied, common, too long, or not whole words.
    tokenizer = build_clip_tokenizer(
        tmp_path, ["sks</w>", "blue</w>", "zykqo</w>", "fep", "zyk</w>", "dog</w>"]
    )
    everything = (0, tokenizer.vocab_size - 1)
    for seed in range(5):
        identifier = choose_identifier(tokenizer, "dog", seed=seed, id_range=everything)
        assert identifier.text == "zyk"
        assert identifier.pool_size == 1
    with pytest.raises(ValueError, match="Found 1 identifier candidates.*need 2"):
        choose_identifier(tokenizer, "dog", num_tokens=2, id_range=everything)


def test_no_candidate_is_a_clear_error() -> None:
    tokenizer = build_word_level_tokenizer(COMMON)
    with pytest.raises(ValueError, match="Found 0 identifier candidates.*add rare short words"):
        choose_identifier(tokenizer, "dog")


def test_default_range_widens_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = build_word_level_tokenizer(COMMON + ["zyk"])  # "zyk" is the last, rarest id
    with caplog.at_level(logging.WARNING, logger="dreambooth.identifier"):
        identifier = choose_identifier(tokenizer, "dog")
    assert identifier.text == "zyk"
    assert identifier.id_range[1] == tokenizer.vocab_size - 1
    assert "Only 0 identifier candidates" in caplog.text


def test_explicit_range_is_not_widened(clip: CLIPTokenizer) -> None:
    with pytest.raises(ValueError, match="Found 0 identifier candidates in token ids 0-10"):
        choose_identifier(clip, "dog", id_range=(0, 10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tokens": 0}, "num_tokens must be 1-3"),
        ({"num_tokens": 4}, "num_tokens must be 1-3"),
        ({"id_range": (5, 2)}, "id_range must satisfy"),
        ({"id_range": (0, 10**6)}, "id_range must satisfy"),
    ],
)
def test_bad_arguments_are_rejected(clip: CLIPTokenizer, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_identifier(clip, "dog", **kwargs)


def test_check_warns_when_a_word_splits_into_tokens(clip: CLIPTokenizer) -> None:
    (problem,) = check_identifier(clip, "xyzzy", "dog")
    assert "'xyzzy' becomes 5 tokens" in problem
    assert "let the tool choose" in problem


def test_check_warns_about_common_words_and_the_rifle(clip: CLIPTokenizer) -> None:
    (blue,) = check_identifier(clip, "blue", "dog")
    assert "common English word" in blue
    (sks,) = check_identifier(clip, "sks", "dog")
    assert "rifle" in sks
    assert "sks" in DENY_LIST


def test_check_warns_about_each_bad_word_and_non_letters(clip: CLIPTokenizer) -> None:
    problems = check_identifier(clip, "zyk blue sks", "dog")
    assert len(problems) == 2
    (digits,) = [p for p in check_identifier(clip, "zyk1", "dog") if "not all letters" in p]
    assert "digits" in digits


def test_check_warns_about_unknown_words() -> None:
    tokenizer = build_word_level_tokenizer(COMMON + RARE)
    (problem,) = check_identifier(tokenizer, "plok", "dog")
    assert "unknown token" in problem


def test_check_rejects_an_empty_identifier(clip: CLIPTokenizer) -> None:
    with pytest.raises(ValueError, match="empty"):
        check_identifier(clip, "  ", "dog")


# Several text encoders (SDXL, SD3, FLUX): one identifier must be one rare token in every tokenizer.


def sdxl_tokenizers() -> list[CLIPTokenizer]:
    """Fresh copies of the tiny SDXL's tokenizer and tokenizer_2: two vocabularies, other ids and sizes."""
    return [tiny_clip_tokenizer(0), tiny_clip_tokenizer(1, pad_token="!")]


@pytest.fixture(scope="module")
def sdxl() -> list[CLIPTokenizer]:
    return sdxl_tokenizers()


@pytest.fixture(scope="module", params=["sdxl", "sdxl_reversed", "clip_t5", "t5_clip_byte_level"])
def tokenizers(request: pytest.FixtureRequest, clip: CLIPTokenizer) -> list[PreTrainedTokenizerBase]:
    builders = {
        "sdxl": sdxl_tokenizers,
        "sdxl_reversed": lambda: sdxl_tokenizers()[::-1],
        "clip_t5": lambda: [clip, build_t5_tokenizer()],  # FLUX: CLIP + T5
        "t5_clip_byte_level": lambda: [build_t5_tokenizer(), clip, build_byte_level_bpe_tokenizer()],
    }
    return builders[request.param]()


def split_message(word: str, tokenizers: list[PreTrainedTokenizerBase]) -> str:
    """The start of check_identifier's message for `word` split unevenly by two tokenizers."""
    first, second = (tokenizer.tokenize(word) for tokenizer in tokenizers)
    counts = [f"{len(pieces)} token{'s' if len(pieces) > 1 else ''}" for pieces in (first, second)]
    return f"'{word}' is {counts[0]} {first} in tokenizer 1 but {counts[1]} {second} in tokenizer 2:"


def test_single_tokenizer_choices_are_unchanged(sdxl: list[CLIPTokenizer]) -> None:
    # Golden values from choose_identifier before it took several tokenizers.
    tokenizer = sdxl[0]
    assert [choose_identifier(tokenizer, "dog", seed=seed).text for seed in range(6)] == [
        "fep", "mok", "lom", "tep", "lom", "tep"
    ]  # fmt: skip
    assert [choose_identifier(tokenizer, "dog", seed=seed, num_tokens=3).text for seed in range(3)] == [
        "fep xon qak", "mok wug ure", "lom zor wug"
    ]  # fmt: skip
    identifier = choose_identifier(tokenizer, "dog", num_tokens=2)
    assert (identifier.token_ids, identifier.id_range, identifier.pool_size) == ((226, 240), (50, 317), 16)
    assert identifier.token_ids_per_tokenizer == (identifier.token_ids,)


def test_a_list_of_one_tokenizer_is_that_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    for seed in range(3):
        assert choose_identifier([tokenizer], "dog", seed=seed) == choose_identifier(
            tokenizer, "dog", seed=seed
        )
    words = "zyk blue sks xyzzy zyk1"
    assert check_identifier((tokenizer,), words, "dog") == check_identifier(tokenizer, words, "dog")


@pytest.mark.parametrize("num_tokens", [1, 2, 3])
def test_identifier_is_one_token_in_every_tokenizer(
    tokenizers: list[PreTrainedTokenizerBase], num_tokens: int
) -> None:
    for seed in range(4):
        identifier = choose_identifier(tokenizers, "dog", num_tokens=num_tokens, seed=seed)
        assert len(identifier.token_ids_per_tokenizer) == len(tokenizers)
        assert identifier.token_ids_per_tokenizer[0] == identifier.token_ids
        low, high = identifier.id_range
        assert all(low <= token_id <= high for token_id in identifier.token_ids)  # rare in the first
        for tokenizer, token_ids in zip(tokenizers, identifier.token_ids_per_tokenizer, strict=True):
            # "a [V] dog" is "a dog" with exactly the identifier's k tokens inserted, in each tokenizer.
            reference, prompt = ids_of(tokenizer, "a dog"), ids_of(tokenizer, f"a {identifier.text} dog")
            position = prompt.index(token_ids[0])
            assert prompt[position : position + num_tokens] == list(token_ids)
            assert prompt[:position] + prompt[position + num_tokens :] == reference
        assert check_identifier(tokenizers, identifier.text, "dog") == []


def test_same_seed_and_tokenizers_choose_the_same_identifier() -> None:
    for seed in range(4):
        first = choose_identifier(sdxl_tokenizers(), "dog", num_tokens=2, seed=seed)
        assert choose_identifier(sdxl_tokenizers(), "dog", num_tokens=2, seed=seed) == first
        assert first.seed == seed
    texts = {choose_identifier(sdxl_tokenizers(), "dog", seed=seed).text for seed in range(8)}
    assert len(texts) > 1


def test_a_word_whole_in_the_first_tokenizer_only_is_never_chosen(sdxl: list[CLIPTokenizer]) -> None:
    tokenizer, tokenizer_2 = sdxl
    # "ilt" (from "quilt") is a whole word in tokenizer_2's vocabulary only.
    assert len(tokenizer.tokenize("ilt")) > 1
    only = tokenizer_2.convert_tokens_to_ids("ilt</w>")
    assert choose_identifier(tokenizer_2, "dog", id_range=(only, only)).text == "ilt"
    message = (
        f"Found 1 identifier candidates in token ids {only}-{only} of tokenizer 1 .*; 0 of them are also "
        r"one whole token in 'a \[V\] dog' in every other tokenizer \(tokenizer 2 keeps 0\); need 1: .*"
        "your own identifier"
    )
    with pytest.raises(ValueError, match=message):
        choose_identifier([tokenizer_2, tokenizer], "dog", id_range=(only, only))
    alone = choose_identifier(tokenizer_2, "dog")
    for seed in range(8):
        both = choose_identifier([tokenizer_2, tokenizer], "dog", seed=seed)
        assert both.pool_size == alone.pool_size - 1
        assert both.text != "ilt"


def test_check_warns_when_tokenizers_split_a_word_differently(sdxl: list[CLIPTokenizer]) -> None:
    tokenizer, tokenizer_2 = sdxl
    assert check_identifier(tokenizer_2, "ilt", "dog") == []
    assert "'ilt' becomes 3 tokens" in check_identifier(tokenizer, "ilt", "dog")[0]
    # Together: one message that shows both splits, not one per tokenizer.
    (problem,) = check_identifier(sdxl, "ilt", "dog")
    assert problem.startswith(split_message("ilt", sdxl))
    assert "one token in every tokenizer" in problem
    (problem,) = check_identifier(sdxl[::-1], "ilt", "dog")
    assert problem.startswith(split_message("ilt", sdxl[::-1]))
    # "zebra" is one token in tokenizer_2 only, and a common word in any tokenizer: said once.
    split, common = check_identifier(sdxl, "zebra", "dog")
    assert split.startswith(split_message("zebra", sdxl))
    assert "common English word" in common
    # Tokenizers that split a word alike are named together.
    (problem,) = check_identifier([tokenizer, tokenizer_2, tokenizer_2], "ilt", "dog")
    assert "but 1 token ['ilt</w>'] in tokenizers 2 and 3:" in problem


def test_check_reports_a_problem_shared_by_tokenizers_once(
    sdxl: list[CLIPTokenizer], clip: CLIPTokenizer
) -> None:
    (problem,) = check_identifier(sdxl, "xyzzy", "dog")
    assert problem.startswith("In tokenizers 1 and 2, 'xyzzy' becomes 5 tokens")
    words = "zyk blue sks xyzzy zyk1"
    alone = check_identifier(clip, words, "dog")
    thrice = check_identifier([clip, clip, clip], words, "dog")
    assert len(thrice) == len(set(thrice)) == len(alone) == 5
    assert [p.removeprefix("In tokenizers 1, 2 and 3, ") for p in thrice] == alone
    word_level = [build_word_level_tokenizer(COMMON + RARE), build_word_level_tokenizer(RARE + COMMON)]
    (problem,) = check_identifier(word_level, "plok", "dog")
    assert problem.startswith("In tokenizers 1 and 2, 'plok' is not in the vocabulary")


def test_no_tokenizers_is_an_error() -> None:
    with pytest.raises(ValueError, match="No tokenizers given"):
        choose_identifier([], "dog")
    with pytest.raises(ValueError, match="No tokenizers given"):
        check_identifier([], "zyk", "dog")


def test_common_words_are_the_ones_wordfreq_calls_common() -> None:
    """`english_zipf` reads wordfreq's buckets itself (not its 35 MB dictionary): on every candidate an
    identifier can be (1-3 lowercase letters) and on words it must fold, it agrees with wordfreq."""
    short = ["".join(c) for n in (1, 2, 3) for c in itertools.product(string.ascii_lowercase, repeat=n)]
    for word in short + ["Blue", "CAFÉ", "naïve", "OHWX", "Straße", "photograph", "unbeknownst"]:
        expected = zipf_frequency(word, "en")
        if expected >= ZIPF_COMMON:
            assert english_zipf(word) == expected, word
        else:
            assert english_zipf(word) == 0.0, word
