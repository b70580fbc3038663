"""The root nursery of ``sender run``: engine, SMTP listener, signal handling.

On SIGTERM or SIGINT: stop accepting (close the listener), let transactions in flight finish
within the grace period, flush the journal, return (the CLI then exits 0).
"""

from __future__ import annotations

import logging
import signal

import trio

from .config import Config
from .engine import Engine
from .inject.smtpd import serve_smtp

__all__ = ["run_daemon"]

log = logging.getLogger("sender.daemon")


async def run_daemon(config: Config, *, repair: bool = False, grace: float = 30.0,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run until SIGTERM/SIGINT (or cancellation).

    Args:
      task_status: started with the engine once the listener is bound.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        engine = Engine(config, repair=repair)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            listener_scope = trio.CancelScope()

            async def listener(task_status=trio.TASK_STATUS_IGNORED) -> None:
                with listener_scope:
                    await serve_smtp(engine, config.listen.smtp, task_status=task_status)

            if config.listen.smtp:
                host, port = await nursery.start(listener)
                print(f"sender: listening on {host}:{port} (SMTP)", flush=True)
            task_status.started(engine)
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                break
            listener_scope.cancel()
            await engine.shutdown(grace)
            nursery.cancel_scope.cancel()
    st = engine.statistics()
    print(f"sender: stopped; accepted {st.accepted}, delivered {st.delivered}, deferred {st.deferred}, "
          f"bounced {st.bounced}, expired {st.expired}, still queued {st.live_messages}", flush=True)
