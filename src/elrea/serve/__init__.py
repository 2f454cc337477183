"""Serving a fitted run: an OpenAI-compatible HTTP server (`elrea serve RUN`).

    from elrea.serve import create_app, serve
    serve("runs/mix", port=8000)              # blocks; or create_app(ELREA...) for your own ASGI server

Needs the `serve` extra: pip install 'elrea[serve]'.
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
