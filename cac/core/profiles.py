"""Options with profiles, as every pixel classifier's are: a frozen dataclass built from a config's
mapping (the chosen profile's settings, then the keys the mapping sets), its choices checked by name."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping, Optional

__all__ = ["options_from", "check_choices"]


def options_from(cls: type, cfg: Optional[Mapping], profiles: Mapping[str, Mapping], name: str,
                 default: str) -> Any:
    """``cls`` from ``cfg``: unknown keys and profiles refused (``ValueError`` naming ``name``'s options),
    then ``profiles[profile]`` under the explicit keys."""
    cfg = dict(cfg or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; known: {sorted(known)}")
    profile = cfg.get("profile", default)
    if profile not in profiles:
        raise ValueError(f"{name}.profile must be one of {tuple(profiles)}, got {profile!r}")
    return cls(**{**profiles[profile], **cfg})


def check_choices(options: Any, choices: Mapping[str, tuple], name: str) -> None:
    """Each field named in ``choices`` holds one of its allowed values."""
    for key, allowed in choices.items():
        if getattr(options, key) not in allowed:
            raise ValueError(f"{name}.{key} must be one of {allowed}, got {getattr(options, key)!r}")
