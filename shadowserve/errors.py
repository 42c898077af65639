"""One error hierarchy for the whole package, so callers can catch what they can act on."""


class ShadowServeError(Exception):
    """Base of every error ShadowServe raises on purpose (user or environment problems)."""


class ConfigError(ShadowServeError):
    """A configuration value is missing, malformed or out of range."""


class ModelError(ShadowServeError):
    """A model cannot be found, downloaded, parsed or run with the given input."""


class ChunkFormatError(ShadowServeError):
    """A KV chunk container is corrupt, truncated, foreign or of an unknown version."""


class StoreError(ShadowServeError):
    """The KV store failed: unreachable, refused, protocol violation, or went away."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (connection refused or reset, no answer in time)."""


class FetchError(ShadowServeError):
    """Fetching a cached prefix into KV blocks failed; the caller recomputes instead."""
