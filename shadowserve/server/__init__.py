"""The OpenAI-compatible HTTP server: the engine on its own thread behind FastAPI handlers."""
