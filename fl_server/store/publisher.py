"""Publish every round's global model to the store, as a round observer of the ServerApp."""

from __future__ import annotations

from collections.abc import Callable, Container
from pathlib import Path

from fl_server.federation import RoundReport
from fl_server.store.store import ModelStore, NewArtefact, VersionInfo
from strategies.dp_mode import DpMode

__all__ = ["RoundPublisher"]


class RoundPublisher:
    """Publish each round's checkpoint as the next version of ``model``, parent = the last one.

    Parameters
    ----------
    store
        Where versions go.
    model
        The model's name in the store.
    run_id
        The run every version records.
    dp_mode
        The run's DP mode (``DpMode.OFF`` without DP), signed into every version so a
        release policy can tell a private model from a non-private one; ``None``: unknown.
    privacy
        Returns (epsilon spent so far, delta) of the run, or None without DP.
    variants
        Builds extra artefacts (ONNX variants) of a round's model; called for the
        rounds in ``variant_rounds`` only, since building and measuring them takes seconds.
    variant_rounds
        The rounds whose versions get the variants.
    """

    def __init__(
        self,
        store: ModelStore,
        *,
        model: str,
        run_id: str,
        dp_mode: DpMode | None = None,
        privacy: Callable[[], tuple[float | None, float] | None] | None = None,
        variants: Callable[[RoundReport], list[NewArtefact]] | None = None,
        variant_rounds: Container[int] = (),
    ) -> None:
        self._store = store
        self._model = model
        self._run_id = run_id
        self._dp_mode = dp_mode
        self._privacy = privacy
        self._variants = variants
        self._variant_rounds = variant_rounds
        self.versions: dict[int, int] = {}
        self._last: int | None = None

    def resume(self, versions: dict[int, int]) -> None:
        """Continue a resumed run from its versions so far (the next one's parent: the last)."""
        self.versions.update(versions)
        if versions:
            self._last = versions[max(versions)]

    def on_round(self, report: RoundReport) -> None:
        """Publish the round's weights (the checkpoint file, streamed into the store)."""
        spent = None if self._privacy is None else self._privacy()
        info = VersionInfo(
            run_id=self._run_id,
            server_round=report.server_round,
            dp_mode=self._dp_mode,
            dp_epsilon=None if spent is None else spent[0],
            dp_delta=None if spent is None else spent[1],
            secure_aggregation=report.secure_aggregation,
            participants=report.num_replies if report.server_round > 0 else None,
            metrics={"accuracy": report.accuracy, "loss": report.loss},
        )
        artefacts = [NewArtefact(name="weights.npz", data=Path(report.model_path))]
        if self._variants is not None and report.server_round in self._variant_rounds:
            artefacts += self._variants(report)
        version = self._store.publish(
            self._model,
            artefacts,
            parent=self._last,
            info=info,
        )
        self._last = version.manifest.version
        self.versions[report.server_round] = self._last
