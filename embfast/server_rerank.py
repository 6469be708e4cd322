"""Moved to :mod:`embfast.server.rerank`; this path is kept for existing imports."""

from embfast.server.rerank import RERANK_ENDPOINTS, add_rerank_routes, load_served_model  # noqa: F401
