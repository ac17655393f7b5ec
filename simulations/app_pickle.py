"""A ClientApp that Flower's Ray backend pickles once per simulation, not once per message.

Flower 1.42's Ray backend hands every message to an actor together with the function
that loads the ClientApp (``RayBackend.process_message``:
``actor.run.remote(app_fn, message, partition_id, context)``), and Ray pickles that
function, the ClientApp it returns and every mod in it with cloudpickle for each call.
Functions defined inside other functions (Flower's loader, the app's registered
functions, closures such as fedge's mods) are pickled by value, and cloudpickle scans
``sys.modules`` for each one: ~3.3 ms of the driver's CPU a message here (2,300
modules loaded), and a secure round of 1,000 devices sends ~4,000 messages.

:func:`prepickled` returns the same app whose pickle is the app's own bytes, pickled
once: pickling it copies those bytes (~0.06 ms). Each actor still unpickles a fresh
copy of the app for every message, as before, so nothing is shared between the
simulated devices an actor serves; the app is frozen as it was when wrapped.
"""

from __future__ import annotations

from typing import Any

from flwr.clientapp import ClientApp
from ray import cloudpickle

__all__ = ["prepickled"]


class _PrepickledClientApp(ClientApp):
    """A ClientApp that pickles as the bytes of the app it was made from."""

    _fedge_pickle: bytes

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # Unpickles to the original app (its class, mods and functions), not to this one.
        return cloudpickle.loads, (self._fedge_pickle,)


def prepickled(app: ClientApp) -> ClientApp:
    """Return ``app`` as it is now, made cheap to pickle (see the module notes)."""
    if isinstance(app, _PrepickledClientApp):
        return app
    blob: bytes = cloudpickle.dumps(app)  # type: ignore[no-untyped-call]
    wrapped = _PrepickledClientApp.__new__(_PrepickledClientApp)
    wrapped.__dict__.update(app.__dict__)
    wrapped._fedge_pickle = blob
    return wrapped
