"""Loading models: names, paths, and clear errors for everything that can be wrong."""

from __future__ import annotations

import json

import pytest

from shadowserve.errors import ModelError
from shadowserve.model.loader import load_model


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError, match="unknown model 'no-such-model'.*tiny-random"):
        load_model("no-such-model")


def test_bad_dtype():
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model("tiny-random", "float8")


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ModelError, match="not a readable GGUF"):
        load_model(str(bad))


def test_truncated_real_gguf(tmp_path):
    from shadowserve.model.weights_download import smollm2_gguf_path

    data = smollm2_gguf_path(progress=False).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError):
        load_model(str(cut))


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(str(tmp_path))
    cfg = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model(str(tmp_path))


def test_random_presets_are_deterministic_and_fingerprinted():
    a, b = load_model("tiny-random"), load_model("tiny-random")
    assert a.fingerprint == b.fingerprint
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert (pa == pb).all()
    assert load_model("tiny-random", "bfloat16").fingerprint != a.fingerprint
