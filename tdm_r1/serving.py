"""What the project's HTTP servers share (`tdm-r1 reward-server`, `tdm-r1 label`): aiohttp apps served on one host
and port until a stop event, SIGINT / SIGTERM or a time limit, with in-flight requests finishing; JSON errors; the
loopback check behind the warning a server gives when it is reachable from other machines."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable


def json_error(status: int, message: str, headers: dict | None = None):
    from aiohttp import web

    return web.json_response({"error": message}, status=status, headers=headers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(
    app, stop_event: Callable[[], asyncio.Event], host: str, port: int, max_seconds: float = 0.0, on_ready=None
) -> None:
    """Serve `app` until the event `stop_event()` (available once the app started) is set, SIGINT / SIGTERM, or
    `max_seconds` passed; in-flight requests finish (graceful shutdown). `on_ready(port)` is called once listening
    (port 0 binds a free one)."""
    import signal

    from aiohttp import web

    runner = web.AppRunner(app, shutdown_timeout=30.0, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    if on_ready is not None:
        on_ready(bound)
    stop = stop_event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if max_seconds > 0:
            try:
                await asyncio.wait_for(stop.wait(), max_seconds)
            except TimeoutError:
                pass
        else:
            await stop.wait()
    finally:
        await asyncio.sleep(0.05)  # let the answer that set the stop event leave
        await runner.cleanup()  # stops accepting, waits for in-flight handlers
