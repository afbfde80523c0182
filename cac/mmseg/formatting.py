"""mmengine formats a config's text with yapf every time it prints, saves or logs one: seven times a
run and once more per checkpoint, a quarter of a second each on a CPU, always for the same text.
yapf is a pure function of its input, so its answers are memoized here: the text mmengine writes is
unchanged, it is formatted once."""
from __future__ import annotations

import functools
import json
from typing import Any, Callable

import mmengine.config.config as mmengine_config

__all__ = ["memoize_config_formatting"]


def _memoized(format_code: Callable[..., Any]) -> Callable[..., Any]:
    @functools.lru_cache(maxsize=64)
    def cached(text: str, style: str, kwargs: str) -> Any:
        return format_code(text, style_config=json.loads(style), **json.loads(kwargs))

    @functools.wraps(format_code)
    def format_code_once(text: str, style_config: Any = None, **kwargs: Any) -> Any:
        try:
            key = (json.dumps(style_config, sort_keys=True), json.dumps(kwargs, sort_keys=True))
        except TypeError:  # a style that is not plain data (a file name is a str: fine) is not cached
            return format_code(text, style_config=style_config, **kwargs)
        return cached(text, *key)

    format_code_once.__wrapped_uncached__ = format_code  # type: ignore[attr-defined]
    format_code_once.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return format_code_once


def memoize_config_formatting() -> None:
    """Wrap mmengine's ``FormatCode`` once (idempotent)."""
    current = mmengine_config.FormatCode
    if not hasattr(current, "__wrapped_uncached__"):
        mmengine_config.FormatCode = _memoized(current)


memoize_config_formatting()
