"""Distributed KV chunk store: one contract, several backends, optional link emulation."""

from shadowserve.store.base import KVStore
from shadowserve.store.registry import open_store

__all__ = ["KVStore", "open_store"]
