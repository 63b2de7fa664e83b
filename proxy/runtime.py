"""The state one configuration serves with (a Runtime: the chain, its routes and
checks, the upstreams), and the application's state around it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from aiohttp import web

from proxy.chain import BuildContext, Chain, Check
from proxy.config import LoadedConfig
from proxy.exchange import Handler
from proxy.routes import Routes
from proxy.routing import Upstreams

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(eq=False)
class Runtime:
    """Everything a request needs, swapped whole on reload."""

    config: LoadedConfig
    upstreams: Upstreams
    chain: Chain
    handler: Handler
    routes: Routes
    ctx: BuildContext
    before_body: tuple[Check, ...] = ()
    in_flight: int = 0
    trusted: tuple[IPNetwork, ...] = ()

    @property
    def middleware_names(self) -> list[str]:
        return self.chain.names


@dataclass
class State:
    runtime: Runtime
    draining: bool = False
    # replaced runtimes whose requests have not all finished
    retiring: set[Runtime] = field(default_factory=set)

    @property
    def in_flight(self) -> int:
        return self.runtime.in_flight + sum(rt.in_flight for rt in self.retiring)


STATE = web.AppKey("chat_proxy_state", State)
