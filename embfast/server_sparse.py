"""Moved to :mod:`embfast.server.sparse`; this path is kept for existing imports."""

from embfast.server.sparse import add_sparse_routes  # noqa: F401
