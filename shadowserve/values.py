"""The human-written values settings accept, parsed once: sizes (``256MiB``), link rates (``10gbit``),
durations (``0.2ms``); and store URLs made safe to show (passwords and tokens masked)."""

from __future__ import annotations

import re

from shadowserve.errors import ConfigError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# Rates in bits per second; "/s" and "ps" suffixes are accepted and ignored.
_RATE_UNITS_BITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "b": 8,
    "kb": 8e3,
    "mb": 8e6,
    "gb": 8e9,
    "kib": 8 * 1024,
    "mib": 8 * 1024**2,
    "gib": 8 * 1024**3,
}

_NUM_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int | float) -> int:
    """Parse a byte size such as ``4096``, ``256MiB`` or ``8GiB`` into bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid size {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"size must be >= 0, got {value!r}")
        return int(value)
    m = _NUM_UNIT.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(f"invalid size {value!r}: use a number with an optional unit like 512MiB or 8GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_rate(value: str | int | float) -> float:
    """Parse a link rate such as ``10gbit`` or ``1.25GB/s`` into **bytes per second**.

    A bare number is taken as bits per second, as ``tc`` does.
    """
    if isinstance(value, bool):
        raise ConfigError(f"invalid rate {value!r}")
    if isinstance(value, (int, float)):
        bits = float(value)
    else:
        text = str(value).strip().lower().replace("/s", "").replace("ps", "")
        m = _NUM_UNIT.match(text)
        if not m:
            raise ConfigError(f"invalid rate {value!r}: use a number with a unit like 10gbit or 500mbit")
        unit = m.group(2) or "bit"
        if unit not in _RATE_UNITS_BITS:
            raise ConfigError(f"invalid rate unit in {value!r}: use bit, kbit, mbit, gbit, or B/KB/MB/GB")
        bits = float(m.group(1)) * _RATE_UNITS_BITS[unit]
    if bits <= 0:
        raise ConfigError(f"rate must be > 0, got {value!r}")
    return bits / 8.0


_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "m": 60.0, "min": 60.0}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def parse_duration(value: str | int | float) -> float:
    """Parse a duration such as ``0.2ms``, ``5s`` or ``30`` (seconds) into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise ConfigError(f"invalid duration {value!r}: use a number with a unit like 0.2ms or 5s")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if seconds < 0:
        raise ConfigError(f"duration must be >= 0, got {value!r}")
    return seconds


_URL_PASSWORD = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*://)?[^/?#@:]*):[^/?#]*@")  # scheme optional: typos too
_URL_SECRET_PARAM = re.compile(r"([?&](?:token|password)=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with its password and secret query values (``token=``) shown as ``***``: for messages and logs."""
    return _URL_SECRET_PARAM.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))
