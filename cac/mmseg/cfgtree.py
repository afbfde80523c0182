"""Edits of mmseg config trees as plain data (dicts and lists), shared by presets, configs and benchmarks."""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["decode_heads", "set_num_classes", "set_by_path", "to_plain", "replace_norm", "strip_pretrained"]


def decode_heads(model: dict) -> list[dict]:
    """The decode head configs of a segmentor (one, or the stages of a cascade)."""
    head = model["decode_head"]
    return list(head) if isinstance(head, (list, tuple)) else [head]


def set_num_classes(model: dict, num_classes: int) -> None:
    for head in decode_heads(model):
        head["num_classes"] = num_classes
    aux = model.get("auxiliary_head")
    for head in (aux if isinstance(aux, (list, tuple)) else [aux] if aux else []):
        head["num_classes"] = num_classes


def set_by_path(cfg: dict, dotted: str, value: Any) -> None:
    """``set_by_path(cfg, 'model.decode_head.channels', 64)``; list items by index (``stages.0``)."""
    keys = dotted.split(".")
    node = cfg
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def to_plain(obj: Any) -> Any:
    """mmengine ConfigDicts to plain dicts (tuples stay tuples: mmseg transforms test for them)."""
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    return obj


def replace_norm(node: Any, old: str, new: str) -> Any:
    """SyncBN needs a process group and a GPU; on the CPU presets every norm of that type becomes BN."""
    if isinstance(node, dict):
        if node.get("type") == old:
            node = {**node, "type": new}
        return {k: replace_norm(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [replace_norm(v, old, new) for v in node]
    return node


def strip_pretrained(node: Any) -> Any:
    """No weights can be downloaded here: embedded presets train from random init."""
    if isinstance(node, dict):
        out = {k: strip_pretrained(v) for k, v in node.items() if k != "pretrained"}
        if isinstance(out.get("init_cfg"), dict) and out["init_cfg"].get("type") == "Pretrained":
            out["init_cfg"] = None
        return out
    if isinstance(node, list):
        return [strip_pretrained(v) for v in node]
    return node
