"""Routing: routers, auxiliary losses, statistics and the recorder. The only home of routing code;
every MoE variant uses these pieces, switched on in config."""

from moe_lora.routing.recorder import AuxLossConfig, RoutingRecorder
from moe_lora.routing.router import Router

__all__ = ["AuxLossConfig", "Router", "RoutingRecorder"]
