"""``bench quality``: its statistics, its seeded tasks, the transcoding shortcut, and a quick real run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from shadowserve.bench.common.quality_pool import pool_runs
from shadowserve.bench.common.quality_stats import accuracy_interval, mcnemar_p, paired_difference
from shadowserve.bench.common.quality_tasks import Question, TaskBuilder, TaskSpec, first_number, is_correct
from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig
from shadowserve.engine.request import SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.kvcache.chunking import chunk_keys, key_seed
from shadowserve.kvcache.codec import KVCodec
from shadowserve.kvcache.levels import QUALITY_LEVELS
from shadowserve.llm import create_engine
from shadowserve.store import open_store

pytest.importorskip("scipy")

# ---- statistics ----------------------------------------------------------------------------------


def test_wilson_interval_matches_the_textbook_value():
    acc, low, high = accuracy_interval([True] * 50 + [False] * 50)
    assert acc == 0.5
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    acc, low, high = accuracy_interval([True] * 10)
    assert acc == 1.0 and high == 1.0 and 0.65 < low < 0.75  # never a zero-width interval at 100%


def test_mcnemar_counts_only_discordant_pairs():
    same = [True, False] * 20
    assert mcnemar_p(same, same) == 1.0
    ref = [True] * 10 + [False] * 30
    worse = [False] * 10 + [False] * 30  # lost 10, gained 0
    assert mcnemar_p(ref, worse) == pytest.approx(2 * 0.5**10)
    # Ten losses and ten gains: no evidence either way, whatever the concordant pairs are.
    mixed = [False] * 10 + [True] * 10 + [False] * 20
    assert mcnemar_p(ref, mixed) == 1.0


def test_paired_difference_is_seeded_and_brackets_the_estimate():
    ref = [True, True, False, True] * 50
    other = [True, False, False, True] * 50  # loses one question in four
    clusters = [i // 4 for i in range(200)]
    d = paired_difference(ref, other, clusters)
    assert d.delta_points == pytest.approx(-25.0) and (d.lost, d.gained) == (50, 0)
    assert d.low <= d.delta_points <= d.high
    assert d == paired_difference(ref, other, clusters)  # seeded
    none = paired_difference(ref, ref, clusters)
    assert (none.delta_points, none.low, none.high) == (0.0, 0.0, 0.0)


def test_cluster_bootstrap_is_wider_when_questions_of_a_document_move_together():
    ref = [True] * 400
    # 40 losses: spread one per document, or all in 5 documents of 8 questions each.
    spread = [i % 10 != 0 for i in range(400)]
    lumped = [i >= 40 for i in range(400)]
    clusters = [i // 10 for i in range(400)]
    clusters_lumped = [i // 8 for i in range(400)]
    a = paired_difference(ref, spread, clusters)
    b = paired_difference(ref, lumped, clusters_lumped)
    assert a.delta_points == b.delta_points == -10.0
    assert (b.high - b.low) > 2 * (a.high - a.low)


# ---- tasks -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder(smollm2):
    return TaskBuilder(smollm2.tokenizer, TaskSpec(needle_documents=3, chain_documents=3, chunks_per_document=3,
                                                   needles=5, chains=3, seed=7))


def test_tasks_are_seeded_chunk_aligned_and_hold_their_facts(builder, smollm2):
    docs = builder.documents()
    assert docs == builder.documents()  # same seed, same ids, same questions
    assert sorted(d.task for d in docs) == ["chain"] * 3 + ["needle"] * 3
    other = TaskBuilder(smollm2.tokenizer, TaskSpec(needle_documents=3, chain_documents=3, chunks_per_document=3,
                                                    needles=5, chains=3, seed=8)).documents()
    assert [d.prefix_ids for d in other] != [d.prefix_ids for d in docs]
    for doc in docs:
        assert len(doc.prefix_ids) == 3 * 256  # exactly the chunks a store holds
        text = smollm2.tokenizer.decode(list(doc.prefix_ids))
        golds = [q.gold for q in doc.questions]
        assert len(set(golds)) == len(golds)
        for q in doc.questions:
            assert 0.0 <= q.depth <= 1.0
            assert f" {q.gold}." in text  # the fact survived the cut to whole chunks
            if q.task == "chain":
                assert f"guarded by the {q.hop}." in text and f"The {q.hop} knows the code {q.gold}." in text
    depths = sorted(q.depth for d in docs for q in d.questions)
    assert depths[0] < 0.3 and depths[-1] > 0.6  # facts at varied depths


def test_scoring_and_second_hop():
    q = Question("chain", 0, 0.5, "What code does the guard of the red door know?",
                 "The red door is guarded by the", "48213", hop="owl")
    assert q.second_hop(" owl.") == ("What code does the owl know?", "The owl knows the code")
    assert Question("needle", 0, 0.5, "?", "x", "1").second_hop("owl") is None
    assert first_number(" 48213.") == "48213" and first_number("no digits") is None
    assert is_correct(q, " 48213.") and not is_correct(q, " 4821.") and not is_correct(q, " 1 48213")


# ---- the transcoding shortcut is exact ---------------------------------------------------------------


def test_transcoded_chunks_are_the_bytes_a_cold_pass_would_save(tiny):
    """bench quality re-encodes losslessly saved chunks instead of computing each document once per codec:
    the bytes must be those the data plane's save stage writes for that codec."""
    prompt = [(5 + 7 * i) % 380 for i in range(2 * 256 + 7)]  # tiny-random's vocabulary is 384
    exact_codec, codec = CodecConfig(quant="none", lossless="none"), QUALITY_LEVELS["balanced"]
    saved = {}
    for name, config in (("exact", exact_codec), ("balanced", codec)):
        url = f"memory://test-transcode-{name}-{id(prompt)}"
        eng = create_engine(EngineConfig(model="tiny-random", kv_cache_memory="64MiB"), loaded=tiny, progress=False,
                            dataplane=DataPlaneConfig(fetch_mode="sync"), store_url=url, codec=config)
        try:
            eng.add_request(prompt, SamplingParams(max_tokens=1))
            while eng.has_unfinished():
                eng.step()
            eng.flush()
        finally:
            eng.close()
        kv_codec = KVCodec(config, tiny.fingerprint)
        keys = chunk_keys(prompt, 256, key_seed(tiny.fingerprint, kv_codec.kv_format_id))
        store = open_store(url)
        saved[name] = (kv_codec, [store.get(k) for k in keys])
    exact, blobs = saved["exact"]
    target, want = saved["balanced"]
    assert len(blobs) == 2 and all(b is not None for b in blobs + want)
    arch = tiny.arch
    kv = torch.empty((arch.num_hidden_layers, 2, 256, arch.num_key_value_heads, arch.head_dim))
    for blob, expected in zip(blobs, want):
        exact.decode(blob, kv)
        assert target.encode(kv) == expected


# ---- a quick real run --------------------------------------------------------------------------------


@pytest.mark.smollm2
@pytest.mark.slow
def _run(recompute: str, codec: str, documents: list[int], kv_format: str = "sskv3/rms:k0.5:v1") -> dict:
    return {"levels": {"balanced": {"codec": f"{kv_format}/zstd"}}, "codecs": {},
            "per_question": {"document": documents, "recompute": recompute, "balanced": codec}}


def test_pooling_joins_runs_question_by_question():
    a = _run("1100", "1000", [0, 0, 1, 1])  # lost one
    b = _run("0011", "1011", [0, 0, 1, 1])  # gained one
    c = _run("111111", "000000", [0, 0, 0, 1, 1, 1])
    ab = pool_runs([a, b], "balanced")
    assert (ab["questions"], ab["documents"], ab["lost"], ab["gained"]) == (8, 4, 1, 1)  # documents kept apart
    assert ab["delta_points"] == 0.0 and ab["mcnemar_p"] == 1.0
    abc = pool_runs([a, b, c], "balanced")
    assert abc["lost"] == 7 and abc["delta_points"] == pytest.approx(-600 / 14)
    assert abc["delta_ci"][0] <= abc["delta_points"] <= abc["delta_ci"][1] and abc["mcnemar_p"] < 0.1
    with pytest.raises(ConfigError, match="did not measure"):  # same name, other KV: never pooled
        pool_runs([a, _run("1", "1", [0], "sskv3/int8")], "balanced")
    with pytest.raises(ConfigError, match="did not measure"):
        pool_runs([a], "compact")
    renamed = _run("0011", "1011", [0, 0, 1, 1])  # the same KV measured as a preset in another run
    renamed["codecs"] = {"preset+k0.3": renamed["levels"].pop("balanced")}
    renamed["per_question"]["preset+k0.3"] = renamed["per_question"].pop("balanced")
    assert pool_runs([a, renamed], "balanced") == ab
    staged = _run("0011", "1011", [0, 0, 1, 1], "sskv4/rms:k0.5:v1")  # format 4: the same KV, staged anew
    assert pool_runs([a, staged], "balanced")["questions"] == 8
    with pytest.raises(ConfigError, match="did not measure"):
        pool_runs([a, _run("0011", "1011", [0, 0, 1, 1], "sskv4/rms:k0.4:v1")], "balanced")
    with pytest.raises(ConfigError, match="per-question"):
        pool_runs([{"levels": {}, "codecs": {}}], "balanced")
    assert "per_task_delta" not in ab  # runs that do not name their questions' tasks
    a["per_question"]["task"], b["per_question"]["task"] = "nncc", "ncnc"
    split = pool_runs([a, b], "balanced")["per_task_delta"]
    assert (split["needle"]["lost"], split["needle"]["gained"], split["chain"]["lost"] + split["chain"]["gained"]) == (1, 1, 0)
    # A run from before the task column: its spec's question counts per document tell the tasks apart.
    older = _run("110", "010", [0, 0, 1])
    older["spec"] = {"needles": 2, "chains": 1}
    split = pool_runs([older], "balanced")["per_task_delta"]
    assert (split["needle"]["lost"], split["chain"]["lost"]) == (1, 0)
    older["spec"] = {"needles": 2, "chains": 2}  # the same count for both: no split
    assert "per_task_delta" not in pool_runs([older], "balanced")


def test_quick_run_writes_the_documented_json(tmp_path, smollm2):
    out, png = tmp_path / "quality.json", tmp_path / "quality.png"
    proc = subprocess.run([sys.executable, "-m", "shadowserve.cli", "bench", "quality", "--quick", "--json", str(out),
                           "--plot", str(png)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["questions"] >= 8 and report["documents"] == 4
    assert 0.0 <= report["recompute"]["accuracy"] <= 1.0
    assert set(report["levels"]) == set(QUALITY_LEVELS) and report["codecs"] == {}
    fields = {"codec", "accuracy", "delta_points", "delta_ci", "mcnemar_p", "identical_share", "ratio_vs_fp16", "kl",
              "ppl_increase_pct", "decode_gbps_per_core"}
    for name, row in report["levels"].items():
        assert fields <= set(row), name
        assert row["delta_ci"][0] <= row["delta_points"] <= row["delta_ci"][1]
        assert 0.0 <= row["mcnemar_p"] <= 1.0 and row["ratio_vs_fp16"] > 0.9
    lossless = report["levels"]["lossless"]
    # Lossless KV reproduces recompute exactly: every answer, hence the accuracy.
    assert lossless["identical_share"] == 1.0
    assert lossless["accuracy"] == report["recompute"]["accuracy"] and lossless["delta_points"] == 0.0
    assert lossless["kl"] < 1e-5
    assert report["levels"]["compact"]["ratio_vs_fp16"] > report["levels"]["balanced"]["ratio_vs_fp16"] \
        > report["levels"]["high"]["ratio_vs_fp16"]
    assert png.stat().st_size > 10_000
    per = report["per_question"]
    assert set(per) == {"document", "task", "recompute", *QUALITY_LEVELS}
    assert len(per["document"]) == len(per["recompute"]) == len(per["task"]) == report["questions"]
    for name, row in report["levels"].items():  # the change split by task adds up to the whole
        split = row["per_task_delta"]
        assert set(split) == {"needle", "chain"} and per["task"].count("n") + per["task"].count("c") == len(per["task"])
        assert sum(d["lost"] for d in split.values()) == row["lost"], name
        assert sum(d["gained"] for d in split.values()) == row["gained"], name
    assert per["lossless"] == per["recompute"]
    twice = pool_runs([report, report], "balanced")  # the same run twice: counts double, the change stays
    row = report["levels"]["balanced"]
    assert (twice["questions"], twice["documents"]) == (2 * report["questions"], 2 * report["documents"])
    assert (twice["lost"], twice["gained"]) == (2 * row["lost"], 2 * row["gained"])
    assert abs(twice["delta_points"] - row["delta_points"]) < 1e-9
    assert twice["per_task_delta"]["needle"]["lost"] == 2 * row["per_task_delta"]["needle"]["lost"]
