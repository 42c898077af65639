"""Gold-answer tasks over long real prose, generated offline from a seed (``bench quality``).

Every document is English text from ``pydoc_data.topics`` with facts hidden at varied depths, and
is asked several questions, so its KV is computed (or fetched) once and shared, as in real prefix
reuse. Two tasks:

* ``needle``: "The secret code of the red door is 48213." sentences, one per colour; each question
  asks for one door's code. Copying one span, found by its key among look-alike distractors.
* ``chain``: "The red door is guarded by the owl." and, elsewhere, "The owl knows the code 48213.";
  the question asks for the code known by the red door's guard. The model answers in two hops
  (first the guard, then that animal's code, each from its own place in the document), and only
  the final code is scored, so a right answer needs both facts joined, not one span copied.

The answer's first words are given to the model (``The secret code of the red door is``), as
needle-in-a-haystack benchmarks do, so scoring reads a number or a word, not free prose. Each
document's token ids are cut to a whole number of chunks: its KV is exactly what a store holds,
and the question is all a request computes on top of it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pydoc_data.topics import topics

from shadowserve.model.tokenizer import Tokenizer

TASKS = ("needle", "chain")
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "silver", "golden", "black", "white",
           "brown", "pink", "grey", "violet", "amber", "scarlet")
ANIMALS = ("cat", "dog", "fox", "owl", "bear", "wolf", "frog", "hawk", "lion", "seal", "goat", "duck",
           "crow", "deer", "mole", "swan")
_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Question:
    """One question about a document, with its gold answer and how to ask the second hop, if any."""

    task: str
    document: int  # index of its document: questions of one document share its KV
    depth: float  # where its (first) fact sits in the document, 0 = start, 1 = end
    ask: str  # the user's question
    primer: str  # the start of the assistant's answer, given to the model
    gold: str  # the right final answer (digits)
    hop: str = ""  # chain: the key the first hop must name (the guard), for diagnostics

    def second_hop(self, first_answer: str) -> tuple[str, str] | None:
        """Chain only: (question, primer) for the code of the animal the first hop named."""
        if self.task != "chain":
            return None
        m = _WORD.search(first_answer.lower())
        animal = m.group(0) if m else "animal"
        return f"What code does the {animal} know?", f"The {animal} knows the code"


@dataclass(frozen=True)
class Document:
    """A document's token ids (chat preamble + prose; a whole number of chunks) and its questions."""

    index: int
    task: str
    prefix_ids: tuple[int, ...]
    questions: tuple[Question, ...]


@dataclass(frozen=True)
class TaskSpec:
    """How many documents of each task, how long, and how many facts (= questions) in each."""

    needle_documents: int = 80
    chain_documents: int = 96
    chunks_per_document: int = 4
    chunk_size: int = 256
    needles: int = 8  # needle: facts and questions per document
    chains: int = 4  # chain: guard/code pairs and questions per document
    seed: int = 0

    @property
    def questions(self) -> int:
        return self.needle_documents * self.needles + self.chain_documents * self.chains


def first_number(answer: str) -> str | None:
    m = _NUMBER.search(answer)
    return m.group(0) if m else None


def is_correct(question: Question, answer: str) -> bool:
    """Whether the (final) answer's first number is the gold code."""
    return first_number(answer) == question.gold


class TaskBuilder:
    """Builds the seeded documents of a :class:`TaskSpec`; the same spec always gives the same ids."""

    def __init__(self, tokenizer: Tokenizer, spec: TaskSpec) -> None:
        self.tokenizer = tokenizer
        self.spec = spec
        text = "\n\n".join(topics[k].strip() for k in sorted(topics))
        self.sentences = _units(text)
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}])
        self.chat_head, self.chat_tail = chat.split("\x00")

    def documents(self) -> list[Document]:
        spec, rng = self.spec, random.Random(self.spec.seed)
        kinds = ["needle"] * spec.needle_documents + ["chain"] * spec.chain_documents
        rng.shuffle(kinds)  # interleaved, so a run cut short still has both tasks
        return [self._needle(i, rng) if kind == "needle" else self._chain(i, rng) for i, kind in enumerate(kinds)]

    def prompt(self, document: Document, ask: str, primer: str) -> list[int]:
        """Token ids of the document followed by a question and the start of the answer."""
        return list(document.prefix_ids) + self.tokenizer.encode(f"{ask}{self.chat_tail}{primer}")

    # ---- generation ---------------------------------------------------------------------------

    def _needle(self, index: int, rng: random.Random) -> Document:
        colours = rng.sample(COLOURS, self.spec.needles)
        codes = _codes(rng, self.spec.needles)
        facts = [f"The secret code of the {c} door is {n}." for c, n in zip(colours, codes)]
        ids, depths = self._document(rng, facts)
        questions = tuple(
            Question("needle", index, d, f"What is the secret code of the {c} door?",
                     f"The secret code of the {c} door is", str(n))
            for c, n, d in zip(colours, codes, depths))
        return Document(index, "needle", ids, questions)

    def _chain(self, index: int, rng: random.Random) -> Document:
        k = self.spec.chains
        colours, animals, codes = rng.sample(COLOURS, k), rng.sample(ANIMALS, k), _codes(rng, k)
        facts = [f"The {c} door is guarded by the {a}." for c, a in zip(colours, animals)]
        facts += [f"The {a} knows the code {n}." for a, n in zip(animals, codes)]
        order = list(range(len(facts)))
        rng.shuffle(order)
        ids, shuffled_depths = self._document(rng, [facts[i] for i in order])
        depths = [0.0] * len(facts)
        for pos, i in enumerate(order):
            depths[i] = shuffled_depths[pos]
        questions = tuple(
            Question("chain", index, depths[j], f"What code does the guard of the {c} door know?",
                     f"The {c} door is guarded by the", str(n), hop=a)
            for j, (c, a, n) in enumerate(zip(colours, animals, codes)))
        return Document(index, "chain", ids, questions)

    def _document(self, rng: random.Random, facts: list[str]) -> tuple[tuple[int, ...], list[float]]:
        """Prose with ``facts`` at spread-out depths, as exactly ``chunks_per_document`` chunks of ids.

        The prose runs past the target length and is cut at the token level; facts go only among the
        sentences that fit, with the facts themselves and 5% to spare, before the cut, so the cut
        never removes one. Returns the ids and each fact's depth (0 = start, 1 = end of the document).
        """
        target = self.spec.chunks_per_document * self.spec.chunk_size
        encode = self.tokenizer.encode
        budget = target - len(encode(self.chat_head)) - sum(len(encode(f)) + 1 for f in facts) - 8
        start = rng.randrange(len(self.sentences))
        sentences: list[str] = []
        ends: list[int] = []  # token count after each sentence
        while not ends or ends[-1] < target * 1.1 or len(sentences) < 2 * len(facts) + 2:
            s = self.sentences[(start + len(sentences)) % len(self.sentences)]
            sentences.append(s)
            ends.append((ends[-1] if ends else 0) + len(encode(s)) + 1)
        usable = min(len(sentences) - 1, max(len(facts) + 1, sum(1 for e in ends if e <= budget * 0.95)))
        # One slot per fact, spread over the usable sentences: fact i lands in the i-th stretch.
        n = len(facts)
        slots = [rng.randrange(1 + i * usable // n, max(2 + i * usable // n, (i + 1) * usable // n)) for i in range(n)]
        for slot, fact in sorted(zip(slots, facts), reverse=True):
            sentences.insert(slot, fact)
        sep = encode("\n\n")  # the question starts on a line of its own
        ids = encode(self.chat_head + " ".join(sentences))[: target - len(sep)] + sep
        depths = [min(1.0, ends[slot - 1] / target) for slot in slots]
        return tuple(ids), depths


def _units(text: str, max_chars: int = 300) -> list[str]:
    """The prose as sentences (and lines), long ones cut at word boundaries, so facts can go anywhere."""
    units: list[str] = []
    for piece in re.split(r"(?<=[.!?])\s+|\n+", text):
        words, current = piece.split(), ""
        for word in words:
            if current and len(current) + len(word) >= max_chars:
                units.append(current)
                current = ""
            current = f"{current} {word}" if current else word
        if current:
            units.append(current)
    return units


def _codes(rng: random.Random, n: int) -> list[int]:
    """``n`` distinct five-digit codes."""
    return rng.sample(range(10000, 100000), n)
