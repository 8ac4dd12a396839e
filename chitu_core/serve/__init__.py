"""The OpenAI-compatible HTTP server (FastAPI + uvicorn); talks to the engine only."""
