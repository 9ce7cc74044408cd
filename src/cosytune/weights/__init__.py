"""Weight files in upstream's format: safe reading, strict checking and loading, atomic saving."""

from __future__ import annotations

from cosytune.weights.io import (
    load_weights,
    normalize_upstream_keys,
    read_state_dict,
    save_state_dict,
    save_weights,
    strict_load,
    upstream_state_dict,
)

__all__ = [
    "load_weights",
    "normalize_upstream_keys",
    "read_state_dict",
    "save_state_dict",
    "save_weights",
    "strict_load",
    "upstream_state_dict",
]
