"""Texts every machine has offline: generated filler, English prose and Python source from the standard library.

Each source is a list of *units* (a sentence, a paragraph, a line of code) that end where a needle may be
inserted without cutting a word. The same seed gives the same units on the same Python installation (the
standard library's documentation and sources change between Python versions).
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Sequence
from pathlib import Path

HAYSTACKS = ("filler", "prose", "code")

_FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")

# Stable, long, plain-Python modules: enough source for a few hundred thousand tokens.
_CODE_MODULES = (
    "argparse", "calendar", "configparser", "dataclasses", "difflib", "fractions", "ftplib", "gettext", "heapq",
    "imaplib", "inspect", "ipaddress", "json.decoder", "json.encoder", "locale", "mailbox", "optparse", "pathlib",
    "pickletools", "pprint", "shlex", "smtplib", "statistics", "string", "tarfile", "textwrap", "threading",
    "tokenize", "typing", "zipfile",
)

# A paragraph is prose when its lines are not indented (code samples and grammar rules are) and it reads as
# sentences: several words, a full stop, no grammar notation.
_PROSE_LINE = re.compile(r"^\S")
_NOT_PROSE = re.compile(r"::=|^\*+$|^=+$|^-+$|>>>", re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def units(kind: str, seed: int) -> list[str]:
    """The units of the haystack ``kind`` (one of :data:`HAYSTACKS`), shuffled by ``seed`` where order is free."""
    if kind == "filler":
        return list(_FILLER) * 4000  # ~100k tokens: the repeated filler of the pass-key literature
    if kind == "prose":
        return _prose(random.Random(seed))
    if kind == "code":
        return _code(random.Random(seed))
    raise ValueError(f"unknown haystack {kind!r}; choose from {', '.join(HAYSTACKS)}")


def _prose(rng: random.Random) -> list[str]:
    """Sentences of English from the interpreter's own documentation (``pydoc_data.topics``), topics shuffled;
    a paragraph's last sentence ends with a blank line."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    rng.shuffle(names)
    sentences = []
    for name in names:
        for block in topics[name].split("\n\n"):
            lines = block.strip("\n").splitlines()
            if not lines or not all(_PROSE_LINE.match(line) for line in lines) or _NOT_PROSE.search(block):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 12 and "." in text:
                first, *rest = _SENTENCE_END.split(text)
                sentences += [first, *(" " + sentence for sentence in rest)]
                sentences[-1] += "\n\n"
    if not sentences:
        raise RuntimeError("pydoc_data.topics has no prose paragraphs in this Python installation")
    return sentences


def _code(rng: random.Random) -> list[str]:
    """Lines of standard-library source, whole modules in a shuffled order."""
    names = list(_CODE_MODULES)
    rng.shuffle(names)
    lines = []
    for name in names:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else spec.origin
        if origin is None or not origin.endswith(".py"):
            continue
        lines += [line for line in Path(origin).read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    if not lines:
        raise RuntimeError(
            "this Python installation ships no standard-library sources (.py files) for the 'code' haystack; "
            "leave it out or install the sources"
        )
    return lines


def token_stream(tokenizer, units: Sequence[str], count: int, start: int = 0) -> tuple[list[int], list[int]]:
    """The first ``count`` tokens of ``units`` read from index ``start`` on (wrapping around), and the offsets
    in that stream where units begin.

    Each unit is tokenized on its own (no special tokens), so a cut at one of the offsets never splits a word.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    tokens, starts, index = [], [], start
    while len(tokens) < count:
        piece = [units[(index + i) % len(units)] for i in range(64)]
        index += len(piece)
        for ids in tokenizer(piece, add_special_tokens=False)["input_ids"]:
            if len(tokens) >= count:
                break
            starts.append(len(tokens))
            tokens += ids
    return tokens[:count], starts


# Common, concrete English nouns: each is one or two tokens for usual tokenizers and easy to say back.
WORDS = (
    "anchor", "apple", "badger", "basket", "beacon", "blanket", "bottle", "bridge", "cactus", "camel", "candle",
    "canyon", "carpet", "castle", "cherry", "circus", "cobalt", "copper", "cotton", "dragon", "falcon", "feather",
    "forest", "garden", "ginger", "glacier", "guitar", "hammer", "harbor", "helmet", "island", "jacket", "jungle",
    "kettle", "ladder", "lantern", "lemon", "magnet", "marble", "meadow", "mirror", "monkey", "needle", "orange",
    "oyster", "paddle", "parrot", "pepper", "pillow", "planet", "pocket", "puzzle", "rabbit", "ribbon", "rocket",
    "saddle", "salmon", "silver", "spider", "statue", "tomato", "tunnel", "turtle", "velvet", "violin", "walnut",
    "window", "wizard", "zipper",
)
KEY_KINDS = ("number", "word", "identifier")


def make_key(kind: str, rng: random.Random) -> str:
    """A key of ``kind`` (one of :data:`KEY_KINDS`): a 5-digit number, a word, or a code identifier."""
    if kind == "number":
        return str(rng.randint(10000, 99999))
    if kind == "word":
        return rng.choice(WORDS)
    if kind == "identifier":
        first, second = rng.sample(WORDS, 2)
        return f"{first}_{second}_{rng.randint(10, 99)}"
    raise ValueError(f"unknown key kind {kind!r}; choose from {', '.join(KEY_KINDS)}")
