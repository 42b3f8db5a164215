"""`facedoor ha-remove`: take this door out of Home Assistant (facedoor.homeassistant)."""
from __future__ import annotations

import argparse

from facedoor.cli import CliContext, CliError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor ha-remove`."""
    parser = commands.add_parser(
        "ha-remove", help="remove this door's device from Home Assistant (clears the discovery message)",
        description="Publish an empty retained payload on <discovery prefix>/device/<door_id>/config.",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    parser.set_defaults(handler=_ha_remove_command)


def _ha_remove_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.homeassistant import discovery_topic
    from facedoor.mqtt import publish_once

    topic = discovery_topic(ctx.config)
    if not publish_once(ctx.config, topic, b"", retain=True, timeout_s=args.timeout):
        raise CliError(f"could not reach the MQTT broker at {ctx.config.mqtt.host}:{ctx.config.mqtt.port} "
                       f"within {args.timeout:g} s; {topic} was not cleared")
    ctx.emit({"removed": topic}, f"removed Home Assistant discovery {topic}")
    return 0
