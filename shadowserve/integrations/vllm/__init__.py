"""ShadowServe inside vLLM: a v1 KV connector over our store, codec, control plane and data plane.

Load it with ``--kv-transfer-config '{"kv_connector": "ShadowServeConnector",
"kv_connector_module_path": "shadowserve.integrations.vllm", "kv_role": "kv_both",
"kv_connector_extra_config": {"store_url": "shadowserve://127.0.0.1:7480"}}'`` (docs/vllm.md).
The connector is imported lazily so that this package imports without vLLM installed.
"""

from __future__ import annotations

__all__ = ["ShadowServeConnector"]


def __getattr__(name: str):
    if name == "ShadowServeConnector":
        from shadowserve.integrations.vllm.connector import ShadowServeConnector

        return ShadowServeConnector
    raise AttributeError(name)
