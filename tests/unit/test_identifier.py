"""Tests for rare-token identifier selection, on small tokenizers of every convention built offline."""

from __future__ import annotations

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
)

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
