"""Serving (DESIGN.md §6): ``perseq serve RUN`` puts a trained run folder behind an HTTP
API with per-user incremental state (``engine``), a durable store (``store``), the
request logic (``service``) and the FastAPI app (``app``)."""
