"""``LLM`` as users write it: the README snippet as a plain script, and ``LLM.chat``.

The script has no ``if __name__ == "__main__"`` guard and never calls ``close()``: it must run,
print its answer, leave no data-plane process and no shared-memory segment behind, and say nothing
on stderr. Run twice against one store, the second run fetches what the first saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import shadowserve
from shadowserve.dataplane.shm import PREFIX, SHM_DIR
from shadowserve.engine.request import SamplingParams
from shadowserve.errors import ConfigError
from shadowserve.llm import LLM
from shadowserve.store.launch import start_store_server

REPO = Path(shadowserve.__file__).resolve().parents[1]

SNIPPET = """\
print("script body ran")
from shadowserve import LLM, SamplingParams

llm = LLM("tiny-random", store="{store}", fetch_mode="offload", kv_quality="balanced")
doc = " ".join(f"line {{i}} of a long document." for i in range(60))
out = llm.generate([doc + " ... question?"], SamplingParams(max_tokens=8))
print(out[0].text, out[0].ttft_ms, out[0].num_fetched_tokens, out[0].fetch_ms)
"""


def _marked_pids(mark: str) -> set[int]:
    """Live processes whose environment carries ``mark`` (the script and what it started)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark.encode() in f.read():
                    pids.add(int(entry))
        except OSError:
            continue
    return pids


def _our_segments(pid: int) -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"{PREFIX}{pid}_")}


def _run_script(path: Path) -> tuple[subprocess.CompletedProcess, set[int], set[str]]:
    """Run ``path`` as a plain script; also report the helper processes and segments seen while it ran."""
    mark = f"SHADOWSERVE_TEST_RUN={uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONPATH=str(REPO), SHADOWSERVE_TEST_RUN=mark.split("=", 1)[1])
    proc = subprocess.Popen([sys.executable, str(path)], env=env, cwd=path.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    helpers: set[int] = set()
    segments: set[str] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the script hung"
        helpers |= _marked_pids(mark) - {proc.pid}
        segments |= _our_segments(proc.pid)
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    time.sleep(0.5)  # anything the script left running would still be here
    assert not _marked_pids(mark), "a process the script started outlived it"
    assert not _our_segments(proc.pid), "the script left shared memory behind"
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), helpers, segments


@pytest.mark.slow
def test_readme_snippet_runs_as_a_plain_script_and_cleans_up(tmp_path):
    server = start_store_server("--capacity", "64MiB")
    try:
        script = tmp_path / "snippet.py"
        script.write_text(SNIPPET.format(store=server.url))
        fetched = []
        for _ in range(2):
            done, helpers, segments = _run_script(script)
            assert done.returncode == 0, done.stderr
            for bad in ("Traceback", "leaked", "resource_tracker", "Error"):
                assert bad not in done.stderr, done.stderr
            assert done.stdout.count("script body ran") == 1  # nothing re-imported the script
            assert helpers, "no data-plane process was seen while the script ran"
            assert any("kv-pool" in s for s in segments), "the KV pool was not in shared memory"
            fields = done.stdout.strip().rsplit(None, 3)
            fetched.append(int(fields[2]))
        assert fetched[0] == 0 and fetched[1] > 0  # the first run saved, the second fetched
    finally:
        server.stop()


@pytest.fixture(scope="module")
def llm():
    with LLM("tiny-random", progress=False) as llm:
        yield llm


def test_chat_matches_generate_on_the_rendered_template(llm):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    second = [{"role": "user", "content": [{"type": "text", "text": "Count "}, {"type": "text", "text": "to 3."}]}]
    texts = [llm.tokenizer.apply_chat_template(first),
             llm.tokenizer.apply_chat_template([{"role": "user", "content": "Count to 3."}])]
    assert texts[0] != texts[1]
    want = [o.token_ids for o in llm.generate(texts, params)]
    assert [o.token_ids for o in llm.chat([first, second], params)] == want
    one = llm.chat(first, params)  # a single conversation gives one output
    assert len(one) == 1 and one[0].token_ids == want[0] and one[0].prompt == texts[0]
    developer = llm.chat([{"role": "developer", "content": "Be brief."}, first[1]], params)
    assert developer[0].token_ids == want[0]  # "developer" is the system role, as in the OpenAI API


@pytest.mark.parametrize("messages, why", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ({"role": "user", "content": "hi"}, "non-empty list"),
    ([{"role": "user"}], "content"),
    ([{"role": "wizard", "content": "hi"}], "role 'wizard'"),
    ([{"content": "hi"}], "role None"),
    (["hi"], "every conversation must be"),
    ([{"role": "user", "content": "hi"}, "and more"], "message 1 must be a dict"),
    ([[{"role": "user", "content": "hi"}], []], "non-empty list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text content parts"),
])
def test_chat_refuses_malformed_messages(llm, messages, why):
    with pytest.raises(ConfigError, match=why):
        llm.chat(messages)


def test_close_is_idempotent_and_releases_the_pool():
    llm = LLM("tiny-random", progress=False)
    llm.close()
    llm.close()
    assert llm.engine.kv_pool.tensor is None
