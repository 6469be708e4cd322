"""Integrations with other frameworks; each submodule imports its framework lazily.

- :mod:`embfast.integrations.ray`: embed a ``ray.data.Dataset`` with one Embedder per actor.
"""

from __future__ import annotations
