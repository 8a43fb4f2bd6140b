"""``key=value`` overrides of an experiment (``--set`` and ``flwr run --run-config overrides=...``).

Hand-written rather than OmegaConf's dotlist: a mapping value here *replaces* the whole section
(``channel={kind: awgn, snr_db: 0}`` must not keep the old channel's keys, which a merge would),
and the space-separated form of Flower's run config needs brackets and quotes kept together.
"""

from __future__ import annotations

from typing import Any

import yaml

from fedllm.core.errors import ConfigError


def split_items(text: str) -> list[str]:
    """Split on whitespace that is outside brackets, braces and quotes (``c=[x, y]`` is one item)."""
    items, current, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch.isspace() and depth == 0:
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(ch)
    if current:
        items.append("".join(current))
    return items


class _Replace(dict):
    """An override whose value is a whole mapping: it replaces the section instead of merging into it."""


def parse_overrides(overrides: str | list[str] | None) -> dict[str, Any]:
    """Parse ``"rounds=5 client.lr=0.001"`` (or a list of such items) into a nested dict.

    Values are read as YAML, so ``5`` is an int and ``[a, b]`` a list; a mapping value
    (``channel={kind: awgn, snr_db: 0}``) replaces the whole section rather than merging into it.
    """
    if not overrides:
        return {}
    items = split_items(overrides) if isinstance(overrides, str) else list(overrides)
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. client.lr=0.001)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            what = " ".join(str(getattr(exc, "problem", None) or exc).split())
            raise ConfigError(f"override {key}: cannot parse value {raw!r} ({what}); values are read as YAML, "
                              "e.g. [a, b] or {kind: awgn}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
        node[parts[-1]] = _Replace(value) if isinstance(value, dict) else value
    return nested


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, _Replace):
            merged[key] = dict(value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted_leaves(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"section.key": value}`` (the spelling of overrides and sweeps)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(dotted_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
