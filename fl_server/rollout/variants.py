"""Pick a model variant per device class from what the devices measured.

Devices report :class:`~edge_runtime.device_profile.DeviceProfile` events: their
class (best provider, else the CPU's INT8 level) and each variant's batch-1 p50
measured on the device. :func:`choose_variants` names, per class, the fastest
variant whose *signed* accuracy clears the floor; :func:`variant_map` turns that
into the ``class -> artefact`` map a signed release directive carries.

Notes
-----
Devices are not trusted. Three choices keep a few of them from steering a class:

- *Comparisons are per device, then a median over devices.* Variant ``a`` beats
  ``b`` in a class when the median over the class's devices of each device's own
  ratio ``latency(a) / latency(b)`` is below one. A median of absolute latencies
  would not do: devices of one class differ in speed (a 1.5 GHz box and a 5 GHz one
  are both ``cpu-avx2``), so one device reporting INT8 at 0.01 ms and FP32 at 1 s
  moves the two medians to different honest devices and can flip the order every
  honest device agrees on. With per-device ratios, devices that report against a
  comparison can flip it only if they are at least half of those that measured
  both variants. The winner is the variant that wins the most such comparisons.
- *Only classes and variants with enough devices count.* A class needs
  ``min_devices`` profiles; a variant, and a comparison, ``min_devices`` devices
  that measured it (a comparison with fewer is a tie). One device alone therefore
  decides nothing; the caller passes one profile per enrolled device (a mapping
  keyed by device id), so a device counts once.
- *Accuracy comes from the signed manifest, never from devices.* Every variant a
  class can get is signed, offered and above the floor: the worst a coordinated
  set of enrolled devices can do is give its own class a slower variant.

Latencies within ``tie_tolerance`` (5 % by default) are a tie, broken toward the
higher accuracy: INT8 is chosen only where it is really faster.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations
from types import MappingProxyType
from typing import TYPE_CHECKING

from edge_runtime.device_profile import DeviceProfile
from edge_runtime.manifest import Manifest, OfferStatus, offer_of
from fedge.errors import ConfigError

if TYPE_CHECKING:
    from fl_server.events.store import EventStore

__all__ = [
    "VariantCandidate",
    "VariantChoice",
    "VariantSelection",
    "choose_variants",
    "offered_accuracy",
    "variant_map",
    "variants_from_events",
]

# A device may report 0 ms (a clock too coarse, or a lie); ratios use at least 1 ns.
logger = logging.getLogger(__name__)

_FLOOR_MS = 1e-6


@dataclass(frozen=True, slots=True, kw_only=True)
class VariantCandidate:
    """A variant of a class that cleared the floor but was not chosen (for display).

    Attributes
    ----------
    artefact, accuracy
        The artefact name and its signed accuracy.
    median_latency_ms
        Median over the class's devices that measured it.
    devices
        How many of the class's devices measured it.
    relative_latency
        Median over devices that measured both of ``latency / latency of the choice``
        (1.5: half as slow again); None when fewer than ``min_devices`` measured both.
    """

    artefact: str
    median_latency_ms: float
    accuracy: float
    devices: int
    relative_latency: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class VariantChoice:
    """The variant chosen for one device class.

    Attributes
    ----------
    device_class
        The class key (:attr:`~edge_runtime.device_profile.DeviceProfile.device_class`).
    artefact, accuracy
        The chosen artefact and its signed accuracy.
    median_latency_ms
        Its median batch-1 p50 over the class's devices that measured it.
    devices
        How many devices of the class reported a profile of this model.
    runners_up
        The other variants above the floor, fastest first.
    """

    device_class: str
    artefact: str
    median_latency_ms: float
    accuracy: float
    devices: int
    runners_up: tuple[VariantCandidate, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class VariantSelection:
    """The choice per class, and why the other classes got none.

    Attributes
    ----------
    choices
        Device class -> :class:`VariantChoice`.
    skipped
        Device class -> why no variant is named for it (too few devices, or no
        variant above the floor that enough of them measured); its devices keep their
        own preference.
    below_floor
        The artefacts whose signed accuracy is under the floor, sorted.
    """

    choices: Mapping[str, VariantChoice] = field(hash=False)
    skipped: Mapping[str, str] = field(hash=False)
    below_floor: tuple[str, ...]


def _finite(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r:.40}")
    return float(value)


def _check_arguments(
    profiles: object, quality: object, min_devices: object, tie_tolerance: object
) -> None:
    if not isinstance(profiles, Mapping):
        raise ConfigError("profiles must map device ids to DeviceProfile (one per device)")
    for device, profile in profiles.items():
        if not isinstance(device, str) or not isinstance(profile, DeviceProfile):
            raise ConfigError(
                f"profiles must map device ids (str) to DeviceProfile, got {device!r:.40}"
            )
    if not isinstance(quality, Mapping):
        raise ConfigError("quality must map artefact names to signed accuracies")
    for name, value in quality.items():
        _finite(f"quality[{name!r:.70}]", value)
    if isinstance(min_devices, bool) or not isinstance(min_devices, int) or min_devices < 1:
        raise ConfigError(f"min_devices must be an int >= 1, got {min_devices!r:.40}")
    if not 0 <= _finite("tie_tolerance", tie_tolerance) < 1:
        raise ConfigError(f"tie_tolerance must be in [0, 1), got {tie_tolerance}")


def _median_log_ratio(
    members: list[DeviceProfile], first: str, second: str, min_devices: int
) -> float | None:
    """Median over devices that measured both of log(first / second); None if too few."""
    logs = [
        math.log(max(p.latency_ms[first], _FLOOR_MS) / max(p.latency_ms[second], _FLOOR_MS))
        for p in members
        if first in p.latency_ms and second in p.latency_ms
    ]
    return statistics.median(logs) if len(logs) >= min_devices else None


def _winner(
    first: str, second: str, log_ratio: float | None, accuracy: Mapping[str, float], tie_log: float
) -> str:
    """Return the faster of two variants; a tie (or too little data) goes to accuracy."""
    if log_ratio is not None and abs(log_ratio) > tie_log:
        return first if log_ratio < 0 else second
    if accuracy[first] != accuracy[second]:
        return first if accuracy[first] > accuracy[second] else second
    if log_ratio is not None and log_ratio != 0:
        return first if log_ratio < 0 else second
    return min(first, second)


def _choose_in_class(
    device_class: str,
    members: list[DeviceProfile],
    eligible: Mapping[str, float],
    min_devices: int,
    tie_log: float,
) -> VariantChoice | str:
    """Return the class's choice, or why there is none."""
    measured = {
        name: [p.latency_ms[name] for p in members if name in p.latency_ms] for name in eligible
    }
    candidates = sorted(name for name, values in measured.items() if len(values) >= min_devices)
    if not candidates:
        return (
            f"no artefact at or above the accuracy floor was measured by {min_devices} or more "
            f"of its {len(members)} devices"
        )
    wins = dict.fromkeys(candidates, 0)
    for first, second in combinations(candidates, 2):
        log_ratio = _median_log_ratio(members, first, second, min_devices)
        wins[_winner(first, second, log_ratio, eligible, tie_log)] += 1
    median_ms = {name: statistics.median(measured[name]) for name in candidates}
    ranked = sorted(
        candidates, key=lambda name: (-wins[name], -eligible[name], median_ms[name], name)
    )
    chosen = ranked[0]

    def relative(name: str) -> float | None:
        log_ratio = _median_log_ratio(members, name, chosen, min_devices)
        return None if log_ratio is None else math.exp(log_ratio)

    runners_up = [
        VariantCandidate(
            artefact=name,
            median_latency_ms=median_ms[name],
            accuracy=eligible[name],
            devices=len(measured[name]),
            relative_latency=relative(name),
        )
        for name in ranked[1:]
    ]
    return VariantChoice(
        device_class=device_class,
        artefact=chosen,
        median_latency_ms=median_ms[chosen],
        accuracy=eligible[chosen],
        devices=len(members),
        runners_up=tuple(runners_up),
    )


def choose_variants(
    profiles: Mapping[str, DeviceProfile],
    quality: Mapping[str, float],
    *,
    accuracy_floor: float,
    min_devices: int = 3,
    tie_tolerance: float = 0.05,
) -> VariantSelection:
    """Pick, per device class, the fastest variant whose signed accuracy clears the floor.

    Parameters
    ----------
    profiles
        Device id -> that device's latest verified profile (so a device counts once).
        A profile that measured none of the artefacts in ``quality`` (another model's)
        is ignored; so are its entries for other artefacts.
    quality
        Artefact name -> signed accuracy, for the artefacts offered
        (:func:`offered_accuracy`).
    accuracy_floor
        Variants with a lower accuracy are never chosen.
    min_devices
        A class needs this many profiles, and a variant this many measurements in it.
    tie_tolerance
        Relative latency difference under which two variants are a tie (broken toward
        the higher accuracy), in [0, 1).

    Returns
    -------
    VariantSelection
        The choice per class, and per class skipped the reason.

    Raises
    ------
    ConfigError
        If an argument is malformed.
    """
    _check_arguments(profiles, quality, min_devices, tie_tolerance)
    floor = _finite("accuracy_floor", accuracy_floor)
    eligible = {name: float(value) for name, value in quality.items() if value >= floor}
    classes: dict[str, list[DeviceProfile]] = {}
    for device in sorted(profiles):
        profile = profiles[device]
        if any(name in quality for name in profile.latency_ms):
            classes.setdefault(profile.device_class, []).append(profile)
    choices: dict[str, VariantChoice] = {}
    skipped: dict[str, str] = {}
    for device_class in sorted(classes):
        members = classes[device_class]
        if len(members) < min_devices:
            skipped[device_class] = (
                f"{len(members)} device(s) reported, fewer than min_devices={min_devices}"
            )
            continue
        outcome = _choose_in_class(
            device_class, members, eligible, min_devices, math.log1p(tie_tolerance)
        )
        if isinstance(outcome, str):
            skipped[device_class] = outcome
        else:
            choices[device_class] = outcome
    return VariantSelection(
        choices=MappingProxyType(choices),
        skipped=MappingProxyType(skipped),
        below_floor=tuple(sorted(name for name in quality if name not in eligible)),
    )


def variant_map(selection: VariantSelection) -> dict[str, str]:
    """Return device class -> chosen artefact name (a release directive's ``variants``)."""
    return {device_class: choice.artefact for device_class, choice in selection.choices.items()}


def offered_accuracy(manifest: Manifest, *, metric: str = "accuracy") -> dict[str, float]:
    """Return artefact name -> ``metric`` for the artefacts the signed manifest offers.

    Raises
    ------
    ConfigError
        If the manifest carries no signed offer (its statuses and numbers would be the
        store database's, unsigned).
    """
    offers = offer_of(manifest)
    if offers is None:
        raise ConfigError(
            f"manifest {manifest.model} v{manifest.version} carries no signed offer: "
            "its accuracies are not signed"
        )
    return {
        name: offer.quality[metric]
        for name, offer in offers.items()
        if offer.status is OfferStatus.OFFERED and metric in offer.quality
    }


def variants_from_events(
    events: EventStore,
    manifest: Manifest,
    *,
    accuracy_floor: float,
    min_devices: int,
    since: datetime,
) -> dict[str, str]:
    """Choose per-class variants of ``manifest`` from the devices' newest profile events.

    A malformed profile is skipped (and logged); each device counts once, with its
    newest profile.
    """
    from edge_runtime.device_events import EventKind

    profiles: dict[str, DeviceProfile] = {}
    for event in events.all_events(kinds=[EventKind.DEVICE_PROFILE], received_after=since):
        try:
            profiles[event.device] = DeviceProfile.from_json(event.body)
        except (ConfigError, ValueError, TypeError):
            logger.warning("variants: malformed device profile from %s", event.device)
    selection = choose_variants(
        profiles, offered_accuracy(manifest), accuracy_floor=accuracy_floor, min_devices=min_devices
    )
    for device_class, why in selection.skipped.items():
        logger.info("variants: no choice for class %s: %s", device_class, why)
    return variant_map(selection)
