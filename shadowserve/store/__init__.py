"""Distributed KV chunk store: one contract, several backends, optional link emulation."""

from shadowserve.store.base import KVStore, open_store

__all__ = ["KVStore", "open_store"]
