"""Wireless uplink models: pure tensor math applied to the whole batch of client payloads.

``CHANNELS`` maps a name (the YAML's ``channel.kind``) to a :class:`Channel` class; each
module below registers itself, so a new channel is one new file imported here.
"""

from channels.base import CHANNELS, Channel, ChannelReport, ClientMeta, build_channel
from channels import ideal as _ideal  # noqa: F401  (registers "ideal")

__all__ = ["CHANNELS", "Channel", "ChannelReport", "ClientMeta", "build_channel"]
