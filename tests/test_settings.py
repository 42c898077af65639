"""Settings merge defaults < YAML < env < flags, coerce types, and reject what they do not know."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from shadowserve.errors import ConfigError
from shadowserve.settings import load_settings, store_url


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "shadowserve.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_have_no_store_and_recompute():
    s = load_settings()
    assert s.store is None and s.store_url is None
    assert s.dataplane.fetch_mode == "recompute"
    assert s.server.port == 8000 and s.engine.model == "smollm2-135m"


def test_precedence_file_then_env_then_flags(tmp_path):
    path = _yaml(tmp_path, "engine: {max_num_seqs: 4, dtype: bfloat16}\nserver: {port: 9001}\n")
    s = load_settings(path)
    assert (s.engine.max_num_seqs, s.engine.dtype, s.server.port) == (4, "bfloat16", 9001)
    env = {"SHADOWSERVE_ENGINE_MAX_NUM_SEQS": "8", "SHADOWSERVE_SERVER_PORT": "9002", "SHADOWSERVE_CACHE": "/x"}
    s = load_settings(path, env)
    assert (s.engine.max_num_seqs, s.engine.dtype, s.server.port) == (8, "bfloat16", 9002)
    s = load_settings(path, env, {"server": {"port": 9003}})
    assert (s.engine.max_num_seqs, s.server.port) == (8, 9003)


def test_a_store_turns_on_offload_and_pinning_unless_told_otherwise():
    s = load_settings(environ={"SHADOWSERVE_STORE": "shadowserve://10.0.0.2:7480", "SHADOWSERVE_MODEL": "tiny-random"})
    assert s.store_url == "shadowserve://10.0.0.2:7480" and s.engine.model == "tiny-random"
    assert s.dataplane.fetch_mode == "offload" and s.dataplane.pin_cores
    s = load_settings(environ={"SHADOWSERVE_STORE": "file:///tmp/kv", "SHADOWSERVE_FETCH_MODE": "thread"})
    assert s.dataplane.fetch_mode == "thread"


def test_store_link_settings_fold_into_the_url():
    s = load_settings(flags={"store": {"url": "shadowserve://h:1?pool=4", "bandwidth": "10gbit", "timeout": "5"}})
    assert s.store_url.startswith("shadowserve://h:1?")
    assert "bandwidth=10gbit" in s.store_url and "pool=4" in s.store_url and "timeout=5.0s" in s.store_url
    from shadowserve.config import StoreConfig

    # The URL's own parameter wins over the config field.
    assert "bandwidth=1gbit" in store_url(StoreConfig(url="redis://h:6379/0?bandwidth=1gbit", bandwidth="5gbit"))


def test_booleans_and_sizes_from_strings():
    s = load_settings(environ={"SHADOWSERVE_ENGINE_ENABLE_PREFIX_CACHING": "off",
                               "SHADOWSERVE_ENGINE_KV_CACHE_MEMORY": "2GiB"})
    assert s.engine.enable_prefix_caching is False and s.engine.kv_cache_memory == "2GiB"


@pytest.mark.parametrize("source, message", [
    ({"environ": {"SHADOWSERVE_ENGINE_MAX_SEQS": "4"}}, "engine has no setting 'max_seqs'"),
    ({"environ": {"SHADOWSERVE_SERVER_PORT": "eighty"}}, "server.port must be an integer"),
    ({"flags": {"engine": {"dtype": "float64"}}}, "unknown dtype"),
    ({"flags": {"dataplane": {"fetch_mode": "teleport"}}}, "unknown fetch mode"),
    ({"flags": {"engine": {"enable_prefix_caching": "maybe"}}}, "must be true or false"),
    ({"flags": {"store": {"bandwidth": "10gbit"}}}, "without store.url"),
    ({"flags": {"gpu": {"count": 1}}}, "unknown section 'gpu'"),
])
def test_bad_values_name_their_setting(source, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(**source)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(_yaml(tmp_path, "engine: [unclosed"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_settings(_yaml(tmp_path, "engine: 3\n"))
    with pytest.raises(ConfigError, match=r"config file .*: engine has no setting 'modle'"):
        load_settings(_yaml(tmp_path, "engine: {modle: x}\n"))


def test_config_show_prints_the_effective_config(tmp_path):
    path = _yaml(tmp_path, "engine: {max_num_seqs: 4}\nserver: {api_key: secret}\n")
    out = subprocess.run(
        [sys.executable, "-m", "shadowserve.cli", "config", "show", "--config", path, "--port", "9100",
         "--set", "codec.quant=int8"],
        capture_output=True, text=True, env={"SHADOWSERVE_ENGINE_DTYPE": "float16", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["engine"]["max_num_seqs"] == 4 and shown["engine"]["dtype"] == "float16"
    assert shown["server"]["port"] == 9100 and shown["codec"]["quant"] == "int8"
    assert shown["server"]["api_key"] == "***" and shown["store"] is None
    bad = subprocess.run([sys.executable, "-m", "shadowserve.cli", "config", "show", "--set", "engine.dtype"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "SECTION.SETTING=VALUE" in bad.stderr and "Traceback" not in bad.stderr


def test_kv_quality_picks_a_level_and_raw_codec_settings_override_it(tmp_path):
    from shadowserve.kvcache.levels import DEFAULT_QUALITY, QUALITY_LEVELS

    assert load_settings().codec == QUALITY_LEVELS[DEFAULT_QUALITY]  # the default level, with nothing set
    s = load_settings(_yaml(tmp_path, "codec: {kv_quality: high}\n"))
    assert s.codec == QUALITY_LEVELS["high"] and s.as_dict()["codec"]["kv_quality"] == "high"
    s = load_settings(environ={"SHADOWSERVE_KV_QUALITY": "lossless"})
    assert s.codec.quant == "none"
    s = load_settings(environ={"SHADOWSERVE_CODEC_KV_QUALITY": "compact", "SHADOWSERVE_CODEC_LOSSLESS": "lz4"})
    assert s.codec.lossless == "lz4" and s.codec.quant == QUALITY_LEVELS["compact"].quant
    assert s.as_dict()["codec"]["kv_quality"] == "compact"  # the lossless stage is a transport choice
    s = load_settings(environ={"SHADOWSERVE_CODEC_KV_QUALITY": "compact", "SHADOWSERVE_CODEC_LEVEL": "3",
                               "SHADOWSERVE_CODEC_KEY_STEP": "0.2"})
    assert s.codec.level == 3 and s.codec.key_step == 0.2
    assert "kv_quality" not in s.as_dict()["codec"]  # no longer a level's codec: shown field by field
    # The flag beats the environment, as every other setting does.
    s = load_settings(environ={"SHADOWSERVE_KV_QUALITY": "lossless"}, flags={"codec": {"kv_quality": "high"}})
    assert s.codec == QUALITY_LEVELS["high"]
    with pytest.raises(ConfigError, match="unknown kv_quality 'best'.*lossless, high, balanced, compact"):
        load_settings(environ={"SHADOWSERVE_KV_QUALITY": "best"})


def test_config_show_round_trips_a_level(tmp_path):
    s = load_settings(_yaml(tmp_path, "codec: {kv_quality: compact}\n"))
    from shadowserve.settings import to_yaml

    again = load_settings(_yaml(tmp_path, to_yaml(s).replace("store: null\n", "")))
    assert again.codec == s.codec


def test_config_show_masks_the_store_password_and_token():
    from shadowserve.settings import to_yaml

    for url in ("rediss://tenant:hunter2@h:6380/0", "shadowserve://h:7480?token=hunter2"):
        s = load_settings(flags={"store": {"url": url}})
        assert s.store_url.startswith(url)  # the engine still gets the real URL
        shown = to_yaml(s)
        assert "hunter2" not in shown and "***" in yaml.safe_load(shown)["store"]["url"]
