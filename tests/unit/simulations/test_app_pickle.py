"""A ClientApp pickled once: the copy Ray's actors load behaves as the app itself."""

from __future__ import annotations

import pickle
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from ray import cloudpickle

from simulations.app_pickle import prepickled
from tests.helpers import delivered


def _pickle(app: ClientApp) -> bytes:
    """Pickle as Ray pickles an actor call's arguments."""
    data: bytes = cloudpickle.dumps(app)  # type: ignore[no-untyped-call]
    return data


def _app(calls: list[str]) -> ClientApp:
    # A closure mod and a train function defined in a function: what cloudpickle must
    # pickle by value (and did, for every message).
    def tagging_mod(msg: Message, context: Context, call_next: Any) -> Message:
        calls.append("mod")
        reply: Message = call_next(msg, context)
        reply.content["tag"] = ConfigRecord({"by": "mod"})
        return reply

    app = ClientApp(mods=[tagging_mod])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        del context
        value = msg.content.config_records["in"]["x"]
        assert isinstance(value, int)
        return Message(RecordDict({"out": ConfigRecord({"y": value + 1})}), reply_to=msg)

    return app


def _context() -> Context:
    return Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})


def _run(app: ClientApp, x: int) -> RecordDict:
    reply = app(delivered(RecordDict({"in": ConfigRecord({"x": x})})), _context())
    return reply.content


def test_the_unpickled_app_is_the_original_app_and_answers_as_it_does() -> None:
    original = _app([])
    wrapped = prepickled(original)

    loaded = pickle.loads(_pickle(wrapped))

    assert type(loaded) is ClientApp  # the original's class, not the wrapper
    content = _run(loaded, 41)
    assert content.config_records["out"]["y"] == 42
    assert content.config_records["tag"]["by"] == "mod"
    assert _run(wrapped, 1).config_records["out"]["y"] == 2  # the wrapper runs too


def test_every_unpickling_is_a_fresh_copy_and_pickling_reuses_the_first_bytes() -> None:
    calls: list[str] = []
    wrapped = prepickled(_app(calls))

    first = pickle.loads(_pickle(wrapped))
    second = pickle.loads(_pickle(wrapped))
    _run(first, 1)

    assert first is not second
    # Each copy carries its own closure state (nothing shared between devices).
    assert first._mods[0].__closure__ is not second._mods[0].__closure__
    assert calls == []  # the driver's list is untouched: the copies hold their own
    # The pickle is the bytes made once, plus a constant wrapper.
    assert _pickle(wrapped) == _pickle(wrapped)
    assert prepickled(wrapped) is wrapped
