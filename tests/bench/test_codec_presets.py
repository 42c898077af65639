"""``bench codec`` preset names with "+" modifiers: transport variants of a preset, checked before any model loads."""

import pytest

from shadowserve.bench.suites.codec import PRESETS, resolve_preset
from shadowserve.errors import ConfigError


def test_modifiers_change_only_what_they_name():
    assert resolve_preset("balanced") == PRESETS["balanced"]
    blocked = resolve_preset("balanced+deflate+blocked")
    assert (blocked.lossless, blocked.lossless_block) == ("deflate", 65536)
    assert blocked.layer_steps == PRESETS["balanced"].layer_steps
    assert resolve_preset("default+blocked16k").lossless_block == 16384
    assert resolve_preset("default+blocked+oneblock").lossless_block == 0


@pytest.mark.parametrize("name", ["nope", "default+brotli", "default+blockedxk", "default+blocked3k"])
def test_unknown_presets_and_modifiers_are_refused(name):
    with pytest.raises(ConfigError):
        resolve_preset(name)
