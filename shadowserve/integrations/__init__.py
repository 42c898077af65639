"""Adapters that put ShadowServe's control and data plane inside other serving engines."""
