"""What ``/health`` says: down (503, a reason), degraded (200, reasons: requests still answered), or ok."""

from __future__ import annotations

from shadowserve.engine.engine import LLMEngine
from shadowserve.server.engine_loop import EngineLoop


def unhealthy_reason(loop: EngineLoop, engine: LLMEngine) -> str | None:
    """Why the server cannot answer requests now, or None."""
    if not loop.alive:
        return loop.fatal or "the engine loop is not running"
    manager = engine.kv_manager
    if manager is not None and not manager.backend.healthy():
        return "the data plane is down (restarting)"
    if manager is not None and not manager.backend.stats() and not manager.stats.dataplane_restarts:
        return "the data plane is starting (no heartbeat yet)"
    return None


def degraded_reasons(engine: LLMEngine) -> list[str]:
    """What keeps the server from serving at full speed while it still answers every request."""
    manager = engine.kv_manager
    health = getattr(manager, "store_health", None)
    store = health.reason() if health is not None else None
    reasons = [store] if store else []
    if manager is not None and not (manager.backend.ready() and manager.backend.stats()):
        reasons.append("the data plane is restarting: requests compute their prefixes until it is ready")
    return reasons
