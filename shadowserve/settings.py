"""The effective configuration of a serving process, merged from defaults, YAML, env and flags.

Later sources win: dataclass defaults < ``--config FILE`` (YAML) < ``SHADOWSERVE_*`` environment
variables < command-line flags. Every value is validated by its component's dataclass, and an
unknown section or setting is an error that names the offending source, never silently ignored.

YAML layout (every section optional)::

    engine:    {model: smollm2-135m, dtype: float32, kv_cache_memory: 2GiB}
    store:     {url: "shadowserve://127.0.0.1:7480", bandwidth: 10gbit}
    dataplane: {fetch_mode: offload, dataplane_cores: auto}
    codec:     {kv_quality: balanced}   # or raw codec settings: {quant: rms, key_step: 0.5, ...}
    server:    {host: 127.0.0.1, port: 8000}

``codec.kv_quality`` (lossless | high | balanced | compact; kvcache/levels.py) picks a named codec;
raw codec settings given beside it override that codec field by field.

Environment: ``SHADOWSERVE_<SECTION>_<SETTING>`` (``SHADOWSERVE_ENGINE_MAX_NUM_SEQS=64``), plus the
shortcuts ``SHADOWSERVE_MODEL``, ``SHADOWSERVE_STORE`` (the store URL), ``SHADOWSERVE_FETCH_MODE`` and
``SHADOWSERVE_KV_QUALITY``.
Other ``SHADOWSERVE_*`` names (``SHADOWSERVE_CACHE``, the model cache) are not settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from shadowserve.config import CodecConfig, DataPlaneConfig, EngineConfig, ServerConfig, StoreConfig
from shadowserve.errors import ConfigError
from shadowserve.kvcache.levels import DEFAULT_QUALITY, codec_for_quality, quality_of
from shadowserve.values import redact_url

SECTIONS: dict[str, type] = {
    "engine": EngineConfig,
    "store": StoreConfig,
    "dataplane": DataPlaneConfig,
    "codec": CodecConfig,
    "server": ServerConfig,
}
ENV_PREFIX = "SHADOWSERVE_"
ENV_SHORTCUTS = {"MODEL": ("engine", "model"), "STORE": ("store", "url"), "FETCH_MODE": ("dataplane", "fetch_mode"),
                 "KV_QUALITY": ("codec", "kv_quality")}
# Settings that are not a field of their section's dataclass: name -> declared type.
EXTRA_SETTINGS: dict[str, dict[str, str]] = {"codec": {"kv_quality": "str"}}

# Raw values by section, as read from one source: {"engine": {"model": "x"}, ...}
Layer = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Settings:
    """One validated config object per component; ``store`` is None when no remote store is set."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    dataplane: DataPlaneConfig = field(default_factory=lambda: DataPlaneConfig(fetch_mode="recompute"))
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig | None = None

    @property
    def store_url(self) -> str | None:
        return None if self.store is None else store_url(self.store)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for printing (the API key and the store URL's password or token are masked)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = None if section is None else dataclasses.asdict(section)
        level = quality_of(self.codec)  # shown when the codec is a level's; raw fields always
        if level is not None:
            out["codec"] = {"kv_quality": level, **out["codec"]}
        if out["server"]["api_key"]:
            out["server"]["api_key"] = "***"
        if out["store"] is not None:
            out["store"]["url"] = redact_url(out["store"]["url"])
        return out


def store_url(config: StoreConfig) -> str:
    """The store URL with the config's link settings folded into its query (the URL's own win)."""
    parts = urlsplit(config.url)
    query = dict(parse_qsl(parts.query))
    extra = {"bandwidth": config.bandwidth, "latency": config.latency}
    if parts.scheme == "shadowserve":
        extra["token_file"] = config.token_file
    if parts.scheme not in ("memory", "file"):
        defaults = StoreConfig()
        if config.timeout != defaults.timeout:
            extra["timeout"] = f"{config.timeout}s"
        if config.connect_timeout != defaults.connect_timeout:
            extra["connect_timeout"] = f"{config.connect_timeout}s"
    for key, value in extra.items():
        if value is not None and key not in query:
            query[key] = str(value)
    return urlunsplit(parts._replace(query=urlencode(query)))


def load_settings(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Layer | None = None,
) -> Settings:
    """Merge the sources in precedence order and validate each component once."""
    layers = []
    if config_file:
        layers.append(read_yaml(config_file))
    if environ is not None:
        layers.append(read_env(environ))
    if flags:
        layers.append(_checked(flags, "command-line flags"))
    merged: Layer = {name: {} for name in SECTIONS}
    for layer in layers:
        for section, values in layer.items():
            merged[section].update(values)
    return build_settings(merged)


def build_settings(merged: Layer) -> Settings:
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = merged.get(name, {})
        if name == "store" and not values.get("url"):
            if values:
                raise ConfigError("store settings were given without store.url (SHADOWSERVE_STORE or --store)")
            built[name] = None
            continue
        if name == "dataplane" and "fetch_mode" not in values:
            # With a store the default is ShadowServe itself; without one there is nothing to fetch.
            values = {**values, "fetch_mode": "offload" if merged.get("store", {}).get("url") else "recompute"}
        if name == "dataplane" and "pin_cores" not in values and merged.get("store", {}).get("url"):
            values = {**values, "pin_cores": True}  # the engine keeps off the data plane's reserved cores
        try:
            if name == "codec":
                values = dict(values)
                built[name] = codec_for_quality(values.pop("kv_quality", DEFAULT_QUALITY), **values)
            else:
                built[name] = cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{name} settings: {exc}") from None
        except TypeError as exc:  # a value of the wrong shape reached a validator
            raise ConfigError(f"invalid {name} settings: {exc}") from None
    return Settings(**built)


def read_yaml(path: str) -> Layer:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in data.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of settings")
    return _checked({k: v or {} for k, v in data.items()}, f"config file {path}")


def read_env(environ: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        if rest in ENV_SHORTCUTS:
            section, key = ENV_SHORTCUTS[rest]
        else:
            section, _, key = rest.partition("_")
            section, key = section.lower(), key.lower()
            if section not in SECTIONS:
                continue  # not a setting (e.g. SHADOWSERVE_CACHE)
        checked = _checked({section: {key: raw}}, f"environment variable {name}")
        layer.setdefault(section, {}).update(checked[section])
    return layer


def _checked(layer: Layer, source: str) -> Layer:
    """Reject unknown sections/settings and coerce values to each field's type."""
    out: Layer = {}
    for section, values in layer.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        known = {f.name: str(f.type) for f in fields(SECTIONS[section])} | EXTRA_SETTINGS.get(section, {})
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: {section} has no setting {key!r}; known: {', '.join(sorted(known))}"
                )
            out.setdefault(section, {})[key] = _coerce(value, known[key], f"{section}.{key}", source)
    return out


def _coerce(value: Any, type_name: str, name: str, source: str) -> Any:
    """Turn a YAML/env value into the field's declared type (``int``, ``float``, ``bool``, ``str | None``...)."""
    options = {t.strip() for t in type_name.split("|")}
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and "None" in options):
        if "None" in options:
            return None
        raise ConfigError(f"{source}: {name} may not be empty")
    if "bool" in options:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if "int" in options and "str" not in options:
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}") from None
    if "float" in options:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
    if "int" in options and isinstance(value, int):
        return value  # sizes such as kv_cache_memory accept plain byte counts
    return str(value)


def to_yaml(settings: Settings) -> str:
    return yaml.safe_dump(settings.as_dict(), sort_keys=False)
