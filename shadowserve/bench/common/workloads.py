"""Workloads built from text Python ships with (``pydoc_data.topics``), so nothing is downloaded.

The load-test workloads return :class:`Workload` (request specs + what to warm the store with);
arrivals are added separately (:func:`with_arrivals`), and everything is deterministic for a seed.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass, field
from pydoc_data.topics import topics

from shadowserve.bench.common.drivers import RequestSpec
from shadowserve.errors import ConfigError
from shadowserve.model.tokenizer import Tokenizer

QUESTIONS = (
    "Summarize the document above in one sentence.",
    "What is the main topic of the document above?",
    "Name one keyword that the document above explains.",
    "Which Python statement does the document above describe first?",
    "Give one example from the document above.",
    "Is the document above about syntax or about the standard library?",
)


def documents(tokenizer: Tokenizer, count: int, tokens_each: int) -> list[str]:
    """``count`` distinct documents of about ``tokens_each`` tokens, cut from the help() topics."""
    texts, current, size = [], [], 0
    for key in sorted(topics):
        body = topics[key].strip()
        current.append(body)
        size += len(tokenizer.encode(body))
        if size >= tokens_each:
            ids = tokenizer.encode("\n\n".join(current))[:tokens_each]
            texts.append(tokenizer.decode(ids))
            current, size = [], 0
            if len(texts) == count:
                return texts
    raise ValueError(f"pydoc topics hold fewer than {count} documents of {tokens_each} tokens")


def long_document_qa(tokenizer: Tokenizer, num_documents: int, questions_per_doc: int, doc_tokens: int) -> list[str]:
    """Prompts in long-document-QA style: each document followed by one of several questions."""
    prompts = []
    for doc in documents(tokenizer, num_documents, doc_tokens):
        for q in range(questions_per_doc):
            question = QUESTIONS[q % len(QUESTIONS)]
            messages = [{"role": "user", "content": f"{doc}\n\n{question}"}]
            prompts.append(tokenizer.apply_chat_template(messages))
    return prompts


# ---- load-test workloads: request specs with arrivals, deterministic for a seed -------------------


@dataclass
class Workload:
    """Request specs plus the prompts whose full chunks belong in the store before the run
    (the shared prefixes a real deployment would have computed and saved earlier)."""

    name: str
    specs: list[RequestSpec]
    warm_prompts: list[list[int]] = field(default_factory=list)


def topic_tokens(tokenizer: Tokenizer) -> list[int]:
    """Every help() topic, in a fixed order, as one token stream (~113K SmolLM2 tokens)."""
    return tokenizer.encode("\n\n".join(topics[k].strip() for k in sorted(topics)))


def _slice(stream: list[int], start: int, n: int) -> list[int]:
    """``n`` tokens from ``start``, wrapping around the stream."""
    start %= len(stream)
    out = stream[start : start + n]
    while len(out) < n:
        out += stream[: n - len(out)]
    return out


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Poisson arrivals: exponential gaps at ``request_rate`` req/s (inf: everything at t=0)."""
    if request_rate <= 0:
        raise ValueError("request_rate must be > 0 (use inf for all at once)")
    if request_rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


def with_arrivals(specs: list[RequestSpec], request_rate: float, seed: int) -> list[RequestSpec]:
    """The same requests, in the same order, arriving as a Poisson process."""
    offsets = arrival_offsets(len(specs), request_rate, seed)
    return [RequestSpec(s.prompt_ids, s.max_tokens, t) for s, t in zip(specs, offsets)]


def long_doc_qa(tokenizer: Tokenizer, num_documents: int, questions_per_doc: int,
                doc_tokens: tuple[int, int] = (2048, 16384), output_len: tuple[int, int] = (16, 256),
                seed: int = 0, stream: list[int] | None = None) -> Workload:
    """LongBench / LMCache long-doc-QA shape: each document asked several short questions.

    Document lengths are drawn uniformly from ``doc_tokens`` and output lengths from ``output_len``;
    requests go question-major (every document's first question, then every second one), so a
    document's later questions find it in the store. The documents are the warm set.
    """
    rng = random.Random(seed)
    stream = stream if stream is not None else topic_tokens(tokenizer)
    sep = tokenizer.encode("\n\nQuestion: ")
    questions = [tokenizer.encode(q) for q in QUESTIONS]
    docs, pos = [], rng.randrange(len(stream))
    for _ in range(num_documents):
        n = rng.randint(*doc_tokens)
        docs.append(_slice(stream, pos, n))
        pos += n
    specs = []
    for q in range(questions_per_doc):
        for doc in docs:
            prompt = doc + sep + questions[(q + len(doc)) % len(questions)]
            specs.append(RequestSpec(tuple(prompt), rng.randint(*output_len)))
    return Workload("long-doc-qa", specs, docs)


def multi_round_chat(tokenizer: Tokenizer, num_conversations: int, rounds: int, system_tokens: int = 1024,
                     user_tokens: int = 64, answer_tokens: int = 128, output_len: tuple[int, int] = (16, 256),
                     seed: int = 0, stream: list[int] | None = None) -> Workload:
    """Multi-round chat: every conversation starts with one shared system prompt, and round k's
    prompt is the system prompt + the k-1 earlier turns (user message + answer) + a new message.

    Requests go round-major. The warm set is each request's context before its new message (what
    earlier rounds computed and saved), so every round can fetch its whole history.
    """
    rng = random.Random(seed)
    stream = stream if stream is not None else topic_tokens(tokenizer)
    system = _slice(stream, rng.randrange(len(stream)), system_tokens)
    convs = []
    for _ in range(num_conversations):
        turns = [(_slice(stream, rng.randrange(len(stream)), user_tokens),
                  _slice(stream, rng.randrange(len(stream)), answer_tokens)) for _ in range(rounds)]
        convs.append(turns)
    specs, warm = [], [system]
    for k in range(rounds):
        for turns in convs:
            history = list(system)
            for user, answer in turns[:k]:
                history += user + answer
            if k:
                warm.append(history)
            specs.append(RequestSpec(tuple(history + turns[k][0]), rng.randint(*output_len)))
    return Workload("chat", specs, warm)


def prefix_repetition(tokenizer: Tokenizer, num_requests: int, prefix_len: int = 2048, suffix_len: int = 128,
                      num_prefixes: int = 4, output_len: int = 64, seed: int = 0,
                      stream: list[int] | None = None) -> Workload:
    """vLLM's ``prefix_repetition`` shape: ``num_prefixes`` shared prefixes, each request one of
    them (balanced, shuffled) plus its own ``suffix_len`` tokens; ``output_len`` tokens out."""
    rng = random.Random(seed)
    stream = stream if stream is not None else topic_tokens(tokenizer)
    prefixes = [_slice(stream, rng.randrange(len(stream)), prefix_len) for _ in range(num_prefixes)]
    which = [i % num_prefixes for i in range(num_requests)]
    rng.shuffle(which)
    specs = [RequestSpec(tuple(prefixes[i] + _slice(stream, rng.randrange(len(stream)), suffix_len)), output_len)
             for i in which]
    return Workload("prefix-repetition", specs, prefixes)


# ---- from command-line flags (bench load, bench paper) ---------------------------------------

WORKLOADS = ("long-doc-qa", "chat", "prefix-repetition")


def int_range(text: str) -> tuple[int, int]:
    """argparse type for ``N`` or ``LO:HI`` (positive, LO <= HI)."""
    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI, got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return a, b


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """Workload and arrival flags (shared with ``bench paper``)."""
    p.add_argument("--workload", choices=WORKLOADS, default="long-doc-qa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-documents", type=int, default=4, help="long-doc-qa: documents")
    p.add_argument("--questions-per-doc", type=int, default=2, help="long-doc-qa: questions per document")
    p.add_argument("--doc-tokens", type=int_range, default=(2048, 16384),
                   help="long-doc-qa: document length range LO:HI (capped to fit the model's context)")
    p.add_argument("--output-len", type=int_range, default=(16, 256), help="output tokens, N or LO:HI")
    p.add_argument("--num-conversations", type=int, default=4, help="chat: conversations")
    p.add_argument("--rounds", type=int, default=3, help="chat: rounds per conversation")
    p.add_argument("--system-tokens", type=int, default=1024, help="chat: shared system prompt tokens")
    p.add_argument("--num-prompts", type=int, default=16, help="prefix-repetition: requests")
    p.add_argument("--prefix-len", type=int, default=2048, help="prefix-repetition: prefix tokens")
    p.add_argument("--suffix-len", type=int, default=128, help="prefix-repetition: suffix tokens")
    p.add_argument("--num-prefixes", type=int, default=4, help="prefix-repetition: distinct prefixes")


def build_workload(args: argparse.Namespace, tokenizer, max_model_len: int):
    """The workload the flags describe, with prompts capped to fit the model's context."""
    out_hi = args.output_len[1]
    room = max_model_len - out_hi - 32  # question / suffix tokens
    if args.workload == "long-doc-qa":
        lo, hi = args.doc_tokens
        hi = min(hi, room)
        if hi < 16:
            raise ConfigError(f"the model's context ({max_model_len}) leaves no room for documents")
        return long_doc_qa(tokenizer, args.num_documents, args.questions_per_doc, (min(lo, hi), hi),
                             args.output_len, args.seed)
    if args.workload == "chat":
        return multi_round_chat(tokenizer, args.num_conversations, args.rounds, args.system_tokens,
                                  output_len=args.output_len, seed=args.seed)
    return prefix_repetition(tokenizer, args.num_prompts, min(args.prefix_len, room), args.suffix_len,
                               args.num_prefixes, args.output_len[0], args.seed)
