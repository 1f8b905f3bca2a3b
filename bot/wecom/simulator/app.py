"""The simulator's aiohttp application."""

from __future__ import annotations

import asyncio

from aiohttp import web

from handlers.domain import Clock

from .api import add_api_routes
from .config import OffsetClock, SimulatorConfig
from .control import add_control_routes
from .state import SIM_STATE, SimulatorState


def create_simulator(config: SimulatorConfig, clock: Clock | None = None) -> web.Application:
    """WeCom's API (`/cgi-bin/...`) plus the control API (`/_sim/...`) in one app.

    Without a clock the simulator follows real time but `/_sim/clock/advance` can still move it ahead.
    """
    if config.callback_tries < 1:
        raise ValueError("callback_tries must be at least 1")
    if not config.kf_accounts:
        raise ValueError("at least one kf account is needed")
    app = web.Application()
    app[SIM_STATE] = SimulatorState(config, clock if clock is not None else OffsetClock())
    add_api_routes(app)
    add_control_routes(app)
    app.on_cleanup.append(_close)
    return app


async def _close(app: web.Application) -> None:
    state = app[SIM_STATE]
    tasks = list(state.tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if state.http is not None:
        await state.http.close()
        state.http = None
