"""Routing: the router (int4 shadow contribution predictor), the selection policy, RoutedMLP,
surgery (swap + undo), statistics collectors and the routed model directory format."""

from adaroute.routing.policy import LayerPolicy, allocate_densities, calibrate_threshold, select_units
from adaroute.routing.routed_mlp import RoutedMLP
from adaroute.routing.router import ShadowRouter
from adaroute.routing.stats import RoutingStats, ScoreTape, collecting
from adaroute.routing.storage import RoutedFormatError, load_routed, save_routed
from adaroute.routing.surgery import route_model, routed_modules, unroute_model

__all__ = [
    "LayerPolicy",
    "RoutedFormatError",
    "RoutedMLP",
    "RoutingStats",
    "ScoreTape",
    "ShadowRouter",
    "allocate_densities",
    "calibrate_threshold",
    "collecting",
    "load_routed",
    "route_model",
    "routed_modules",
    "save_routed",
    "select_units",
    "unroute_model",
]
