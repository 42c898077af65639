"""``bench codec`` preset names with "+" modifiers: transport variants of a preset, checked before any model loads."""

import pytest

from shadowserve.bench.suites.codec import PRESETS, resolve_preset
from shadowserve.errors import ConfigError
from shadowserve.kvcache.schedules import step_multipliers


def test_modifiers_change_only_what_they_name():
    assert resolve_preset("balanced") == PRESETS["balanced"]
    blocked = resolve_preset("balanced+deflate+blocked")
    assert (blocked.lossless, blocked.lossless_block) == ("deflate", 65536)
    assert blocked.layer_steps == PRESETS["balanced"].layer_steps
    assert resolve_preset("default+blocked16k").lossless_block == 16384
    assert resolve_preset("default+blocked+oneblock").lossless_block == 0


@pytest.mark.parametrize("name", ["nope", "default+brotli", "default+blockedxk", "default+blocked3k", "default+channels3",
                                  "default+k99", "default+channelsx", "default+kx", "default+h18k2", "default+h18k2x2",
                                  "default+h18q2x0.5", "int8-zstd+h1k0x0.5"])
def test_unknown_presets_and_modifiers_are_refused(name):
    with pytest.raises(ConfigError):
        resolve_preset(name)


def test_step_and_channel_modifiers():
    c = resolve_preset("planes-qa-5x-smollm2+channels+k0.3")
    assert (c.key_channel_steps, c.key_channel_power, c.key_step) == ("smollm2-135m", 0.5, 0.3)
    assert c.layer_steps == PRESETS["planes-qa-5x-smollm2"].layer_steps
    assert resolve_preset("default+channels1+v1.5").key_channel_power == 1.0
    assert resolve_preset("default+v1.5").value_step == 1.5


def test_head_modifiers_add_to_the_named_set():
    assert resolve_preset("planes-qa-5x-smollm2+heads").head_steps == "smollm2-135m-retrieval"
    c = resolve_preset("planes-qa-5x-heads-smollm2+h18k2x0.1+h2v0x0.5")
    pins = dict(item.split(":") for item in c.head_steps.split(","))
    assert pins["18k2"] == "0.1" and pins["2v0"] == "0.5"  # one head overridden, one added
    assert pins["23k0"] == "0.32" and len(pins) == 10  # the rest of the set kept
    assert resolve_preset("default+h1k0x0.5+h1k0x0.25").head_steps == "1k0:0.25"


def test_plane_modifiers_scale_one_plane_of_the_schedule():
    base = step_multipliers(PRESETS["balanced"])
    c = resolve_preset("balanced+p18kx2+p0vx0.5+p18kx0.5")
    got = step_multipliers(c)
    changed = {i for i, (a, b) in enumerate(zip(base, got)) if a != b}
    assert changed == {1}  # value plane of layer 0 halved; layer 18's keys x2 then x0.5 is its own step again
    assert got[1] == pytest.approx(base[1] / 2) and got[36] == pytest.approx(base[36])
    assert resolve_preset("balanced+p29vx3").layer_steps.count(",") == 59
    for bad in ("balanced+p30kx2", "balanced+p1qx2", "default+p1kx2"):  # no such layer, no such plane, no schedule
        with pytest.raises(ConfigError):
            resolve_preset(bad)
