"""Answers every quality-benchmark question once per codec, with each document's KV computed once.

One *cold* engine computes each document (exactly a whole number of chunks) and saves its chunks
losslessly to an in-process store, as a cold pass of a real deployment would; its answers are the
``recompute`` answers. Each codec then gets the same chunks re-encoded by the same ``KVCodec.encode``
the data plane's save stage runs (so the bytes are those a cold pass with that codec would have
saved: tests/bench/test_quality.py checks it), puts them in its own store, and answers with an
engine that *fetches* the document (the data plane's fetch → decompress → dequantize → scatter) and
computes only the question. The default level's store is a real store server and its engine fetches
through the isolated data plane (``offload``) unless told otherwise; the others use ``sync``, the same
pipeline code in-process, which lands the same KV.

Every engine sees the same sequence of batches (a warm request per document, then all questions of a
few documents at once, then the chain tasks' second hops), so with a lossless codec every answer is
token for token recompute's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shadowserve.bench.common.quality_tasks import Document, Question, TaskBuilder, is_correct
from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.engine.engine import LLMEngine
from shadowserve.engine.request import SamplingParams
from shadowserve.errors import FetchError
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from shadowserve.kvcache.codec import KVCodec
from shadowserve.llm import create_engine
from shadowserve.model.loader import LoadedModel
from shadowserve.store import open_store

EXACT_CODEC = CodecConfig(quant="none", lossless="none")
# Greedy tokens per answer: a code is a space and five one-digit tokens; a guard is one word (1-2 tokens).
# Generating only what scoring reads keeps the run short: decode at 1K context is its main cost.
CODE_TOKENS, GUARD_TOKENS = 6, 3


@dataclass
class Answers:
    """One configuration's answers, in question order (document order, then question order)."""

    correct: list[bool] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)  # every hop's tokens, concatenated
    first_hop_correct: list[bool | None] = field(default_factory=list)  # chain only
    fetched_tokens: int = 0
    document_tokens: int = 0


class Contestant:
    """A codec under test: its store (filled by transcoding) and an engine that fetches from it."""

    def __init__(self, name: str, codec: CodecConfig, loaded: LoadedModel, engine_config: EngineConfig,
                 store_url: str, fetch_mode: str, chunk_size: int) -> None:
        self.name, self.fetch_mode = name, fetch_mode
        plane = DataPlaneConfig(fetch_mode=fetch_mode, chunk_size=chunk_size, save=False)
        self.engine = create_engine(engine_config, loaded=loaded, progress=False, dataplane=plane,
                                    store_url=store_url, codec=codec)
        # After the engine: it picks the weight kernel, which is part of the model fingerprint.
        self.codec = KVCodec(codec, loaded.fingerprint)
        self.seed = key_seed(loaded.fingerprint, self.codec.kv_format_id)
        self.store = open_store(store_url)
        self.answers = Answers()

    def close(self) -> None:
        self.engine.close()
        self.store.close()


class QualityRunner:
    """Drives the cold engine and every contestant over the documents, a few documents at a time."""

    def __init__(self, loaded: LoadedModel, builder: TaskBuilder, contestants: dict[str, CodecConfig],
                 default_name: str, default_store_url: str | None, default_fetch_mode: str, group: int = 4,
                 kv_cache_memory: str = "512MiB") -> None:
        """``default_name`` fetches from ``default_store_url`` (a store server) by ``default_fetch_mode``
        when a URL is given; every other contestant has an in-process store and fetches by ``sync``."""
        self.loaded, self.builder, self.group = loaded, builder, max(1, group)
        self.chunk_size = builder.spec.chunk_size
        run_id = f"qbench-{id(self)}"
        self.engine_config = EngineConfig(model=loaded.name, kv_cache_memory=kv_cache_memory,
                                          enable_prefix_caching=True, max_num_seqs=64)
        exact_url = f"memory://{run_id}-exact?capacity=2GiB"
        self.cold = create_engine(self.engine_config, loaded=loaded, progress=False,
                                  dataplane=DataPlaneConfig(fetch_mode="sync", chunk_size=self.chunk_size),
                                  store_url=exact_url, codec=EXACT_CODEC)
        self.exact_codec = KVCodec(EXACT_CODEC, loaded.fingerprint)
        self.exact_seed = key_seed(loaded.fingerprint, self.exact_codec.kv_format_id)
        self.exact_store = open_store(exact_url)
        self.recompute = Answers()
        self.contestants: dict[str, Contestant] = {}
        try:
            for name, codec in contestants.items():
                if name == default_name and default_store_url is not None:
                    url, mode = default_store_url, default_fetch_mode
                else:
                    url, mode = f"memory://{run_id}-{len(self.contestants)}?capacity=1GiB", "sync"
                self.contestants[name] = Contestant(name, codec, loaded, self.engine_config, url, mode,
                                                    self.chunk_size)
        except BaseException:
            self.close()
            raise

    def run(self, documents: list[Document], progress: Callable[[int], None] | None = None) -> None:
        for start in range(0, len(documents), self.group):
            docs = documents[start: start + self.group]
            _answer(self.cold, self.builder, docs, self.recompute)
            self.cold.flush()
            for doc in docs:
                self._transcode(doc)
            for c in self.contestants.values():
                _answer(c.engine, self.builder, docs, c.answers)
                c.engine.flush()
            if progress:
                progress(len(docs))

    def _transcode(self, doc: Document) -> None:
        """Re-encode the document's exact chunks with every contestant's codec, into its store."""
        arch = self.loaded.arch
        shape = (arch.num_hidden_layers, 2, self.chunk_size, arch.num_key_value_heads, arch.head_dim)
        exact = torch.empty(shape, dtype=torch.float32)
        keys = chunk_keys(doc.prefix_ids, self.chunk_size, self.exact_seed)
        per_contestant = {n: chunk_keys(doc.prefix_ids, self.chunk_size, c.seed)
                          for n, c in self.contestants.items()}
        for i, key in enumerate(keys):
            blob = self.exact_store.get(key)
            if blob is None:
                raise FetchError(f"the cold pass did not save chunk {i} of document {doc.index}")
            self.exact_codec.decode(blob, exact)
            for name, c in self.contestants.items():
                c.store.put(per_contestant[name][i], c.codec.encode(exact))

    def close(self) -> None:
        for c in self.contestants.values():
            c.close()
        self.cold.close()
        self.exact_store.close()


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], int]]:
    """Greedy outputs (tokens, fetched prompt tokens) of ``prompts`` submitted together."""
    params = SamplingParams(max_tokens=max_tokens)
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [(list(r.output_token_ids), r.num_fetched_tokens) for r in reqs]


def _answer(engine: LLMEngine, builder: TaskBuilder, docs: list[Document], out: Answers) -> None:
    """Answer every question of ``docs`` on ``engine``, in the one batch order all engines share."""
    tok = builder.tokenizer
    # 1. The documents themselves (one token past their last chunk, so every chunk is fetchable).
    warm = _generate(engine, [list(d.prefix_ids) + [d.prefix_ids[-1]] for d in docs], 1)
    out.fetched_tokens += sum(f for _, f in warm)
    out.document_tokens += sum(len(d.prefix_ids) for d in docs)
    # 2. Every question of these documents at once; 3. the chain questions' second hops.
    questions: list[tuple[Document, Question]] = [(d, q) for d in docs for q in d.questions]
    first: dict[int, list[int]] = {}
    for task, max_tokens in (("needle", CODE_TOKENS), ("chain", GUARD_TOKENS)):
        picked = [i for i, (_, q) in enumerate(questions) if q.task == task]
        prompts = [builder.prompt(questions[i][0], questions[i][1].ask, questions[i][1].primer) for i in picked]
        outs = _generate(engine, prompts, max_tokens) if picked else []
        first.update({i: tokens for i, (tokens, _) in zip(picked, outs)})
    hops = [(i, q.second_hop(tok.decode(first[i]))) for i, (_, q) in enumerate(questions)]
    hops = [(i, h) for i, h in hops if h is not None]
    second = _generate(engine, [builder.prompt(questions[i][0], *h) for i, h in hops], CODE_TOKENS) if hops else []
    final = {i: tokens for (i, _), (tokens, _) in zip(hops, second)}
    for i, (_, q) in enumerate(questions):
        tokens = final.get(i, first[i])
        text = tok.decode(tokens)
        out.correct.append(is_correct(q, text))
        out.tokens.append(tuple(itertools.chain(first[i], final.get(i, []))))
        if q.task == "chain":
            out.first_hop_correct.append(tok.decode(first[i]).strip().lower().startswith(q.hop))
        else:
            out.first_hop_correct.append(None)

