"""Wireless uplink models: pure tensor math applied to the whole batch of client payloads.

``CHANNELS`` maps a name (the YAML's ``channel.kind``) to a :class:`Channel` class; each
module below registers itself, so a new channel is one new file imported here.
"""

# Each import registers its channels by name.
from . import awgn, byzantine, compose, erasure, fading, ideal, mimo_mac, ota, quantize  # noqa: F401,E402
from .base import CHANNELS, Channel, ChannelReport, ClientMeta, build_channel

__all__ = ["CHANNELS", "Channel", "ChannelReport", "ClientMeta", "build_channel"]
