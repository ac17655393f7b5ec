"""A strict binary codec for the protocol messages, so adapters carry opaque bytes.

Every message is ``tag | version | fields`` with big-endian fixed-width
integers and length-prefixed blobs. Decoding checks the tag, every length
against its bound and that no byte is left over; any violation raises
:class:`InvalidMessage`. Masked vectors are not encoded here: adapters ship
them as native arrays of the ring's dtype, and :class:`ServerSession` checks
their type and length.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar, cast

import numpy as np
import numpy.typing as npt

from secure_agg.encoding import EncodingConfig
from secure_agg.errors import InvalidMessage
from secure_agg.identity import MAX_ENROLMENT_ID, MAX_EXPIRES_AT, IdentityCertificate
from secure_agg.messages import (
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    GraphSetup,
    KeyAdvertisement,
    MaskedInputReport,
    MaskedInputRequest,
    PreKey,
    PrekeyedSetup,
    PrekeyedShares,
    PreKeyRequest,
    RoundSetup,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from secure_agg.params import ThreatModel
from secure_agg.shamir import CHUNKS_PER_SECRET

__all__ = [
    "MAX_NODES",
    "Reader",
    "Writer",
    "decode",
    "encode",
    "encode_graph_setup",
    "encode_prekeyed_setup",
    "prekey_list",
]

MAX_NODES: Final = 1 << 20
_MAX_BLOB: Final = 1 << 16
_MAX_VECTOR: Final = 1 << 31
# 2: the unmask request carries bundles (rounds on a server-drawn graph).
_VERSION: Final = 2
_KEY: Final = 32
_DIGEST: Final = 32
_SIGNATURE: Final = 64
# UTF-8 takes at most 4 bytes a character.
_MAX_ENROLMENT_BYTES: Final = 4 * MAX_ENROLMENT_ID

T = TypeVar("T")


class Writer:
    """Append big-endian fields to a byte string."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> None:
        """Append an unsigned byte."""
        self._parts.append(struct.pack(">B", value))

    def u32(self, value: int) -> None:
        """Append an unsigned 32-bit integer."""
        self._parts.append(struct.pack(">I", value))

    def u64(self, value: int) -> None:
        """Append an unsigned 64-bit integer."""
        self._parts.append(struct.pack(">Q", value))

    def f64(self, value: float) -> None:
        """Append an IEEE double."""
        self._parts.append(struct.pack(">d", value))

    def fixed(self, value: bytes, size: int) -> None:
        """Append exactly ``size`` bytes."""
        if len(value) != size:
            raise InvalidMessage(f"expected {size} bytes, got {len(value)}")
        self._parts.append(value)

    def blob(self, value: bytes) -> None:
        """Append a length-prefixed byte string."""
        if len(value) > _MAX_BLOB:
            raise InvalidMessage(f"a field of {len(value)} bytes exceeds {_MAX_BLOB}")
        self.u32(len(value))
        self._parts.append(value)

    def section(self, value: bytes) -> None:
        """Append a length-prefixed nested message (no small-field limit)."""
        self.u32(len(value))
        self._parts.append(value)

    def ids(self, values: Sequence[int]) -> None:
        """Append a count and that many node ids."""
        self.u32(len(values))
        self._parts.append(struct.pack(f">{len(values)}Q", *values))

    def shares(self, values: Mapping[int, npt.NDArray[np.uint32]]) -> None:
        """Append a map from node id to one Shamir share of one secret."""
        self.u32(len(values))
        for node in sorted(values):
            self.u64(node)
            self._parts.append(np.asarray(values[node], dtype=">u4").tobytes())

    def getvalue(self) -> bytes:
        """Return everything appended so far."""
        return b"".join(self._parts)


class Reader:
    """Consume big-endian fields from a byte string, rejecting anything malformed."""

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidMessage(f"expected bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0

    def _take(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise InvalidMessage("message truncated")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        """Read an unsigned byte."""
        return int(self._take(1)[0])

    def u32(self) -> int:
        """Read an unsigned 32-bit integer."""
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        """Read an unsigned 64-bit integer."""
        return int(struct.unpack(">Q", self._take(8))[0])

    def f64(self) -> float:
        """Read an IEEE double."""
        return float(struct.unpack(">d", self._take(8))[0])

    def fixed(self, size: int) -> bytes:
        """Read exactly ``size`` bytes."""
        return self._take(size)

    def blob(self) -> bytes:
        """Read a length-prefixed byte string."""
        size = self.u32()
        if size > _MAX_BLOB:
            raise InvalidMessage(f"a field of {size} bytes exceeds {_MAX_BLOB}")
        return self._take(size)

    def section(self) -> bytes:
        """Read a length-prefixed nested message."""
        return self._take(self.u32())

    def count(self, limit: int = MAX_NODES) -> int:
        """Read an element count and check it against ``limit``."""
        value = self.u32()
        if value > limit:
            raise InvalidMessage(f"{value} elements exceed the limit of {limit}")
        return value

    def ids(self) -> tuple[int, ...]:
        """Read a count and that many node ids."""
        size = self.count()
        values: tuple[int, ...] = struct.unpack(f">{size}Q", self._take(8 * size))
        return values

    def distinct_ids(self) -> tuple[int, ...]:
        """Read node ids and reject duplicates."""
        values = self.ids()
        if len(set(values)) != len(values):
            raise InvalidMessage("duplicate node ids")
        return values

    def shares(self) -> dict[int, npt.NDArray[np.uint32]]:
        """Read a map from node id to one Shamir share of one secret."""
        out: dict[int, npt.NDArray[np.uint32]] = {}
        for _ in range(self.count()):
            node = self.u64()
            if node in out:
                raise InvalidMessage(f"two shares for node {node}")
            raw = np.frombuffer(self._take(4 * CHUNKS_PER_SECRET), dtype=">u4")
            out[node] = raw.astype(np.uint32)
        return out

    def finish(self) -> None:
        """Raise unless every byte was consumed."""
        if self._pos != len(self._data):
            raise InvalidMessage(f"{len(self._data) - self._pos} unexpected trailing bytes")


def _put_setup(w: Writer, m: RoundSetup) -> None:
    w.blob(m.round_id)
    w.u64(m.node_id)
    w.ids(m.participants)
    w.u32(m.degree)
    w.u32(m.threshold)
    w.f64(m.encoding.clip_range)
    w.u8(m.encoding.ring_bits)
    w.u32(m.encoding.max_clients)
    w.u32(m.encoding.weight_cap)
    w.u64(m.vector_length)
    w.blob(m.threat_model.value.encode())


def _get_setup(r: Reader) -> RoundSetup:
    round_id, node_id, participants = r.blob(), r.u64(), r.distinct_ids()
    degree, threshold = r.u32(), r.u32()
    clip, bits, max_clients, cap = r.f64(), r.u8(), r.u32(), r.u32()
    length = r.u64()
    threat = r.blob()
    if not 16 <= len(round_id) <= 64:
        raise InvalidMessage("round id of the wrong size")
    if not 2 <= length <= _MAX_VECTOR:
        raise InvalidMessage(f"vector length {length} out of range")
    if len(participants) < 2 or node_id not in participants:
        raise InvalidMessage("the participants must be two or more and include the recipient")
    if not 1 <= threshold <= degree < len(participants):
        raise InvalidMessage(f"degree {degree} and threshold {threshold} out of range")
    try:
        threat_model = ThreatModel(threat.decode("ascii"))
        encoding = EncodingConfig(
            clip_range=clip, ring_bits=bits, max_clients=max_clients, weight_cap=cap
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidMessage(f"invalid round setup: {exc}") from exc
    return RoundSetup(
        round_id=round_id,
        node_id=node_id,
        participants=participants,
        degree=degree,
        threshold=threshold,
        encoding=encoding,
        vector_length=length,
        threat_model=threat_model,
    )


def _put_signed(
    w: Writer, certificate: IdentityCertificate | None, signature: bytes | None
) -> None:
    if certificate is None or signature is None:
        w.u8(0)
        return
    # Flag 1: a version-1 certificate (no expiry); flag 2: version 2, its expiry last.
    expires_at = certificate.expires_at
    w.u8(1 if expires_at is None else 2)
    w.blob(certificate.enrolment_id.encode("utf-8"))
    w.fixed(certificate.public_key, _KEY)
    w.fixed(certificate.signature, _SIGNATURE)
    if expires_at is not None:
        w.u64(expires_at)
    w.fixed(signature, _SIGNATURE)


def _get_signed(r: Reader) -> tuple[IdentityCertificate | None, bytes | None]:
    flag = r.u8()
    if flag == 0:
        return None, None
    if flag not in (1, 2):
        raise InvalidMessage("invalid certificate flag")
    raw_id = r.blob()
    if not 0 < len(raw_id) <= _MAX_ENROLMENT_BYTES:
        raise InvalidMessage(f"an enrolment id has 1..{MAX_ENROLMENT_ID} characters")
    try:
        enrolment_id = raw_id.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage("enrolment id is not UTF-8") from exc
    if len(enrolment_id) > MAX_ENROLMENT_ID:
        raise InvalidMessage(f"an enrolment id has 1..{MAX_ENROLMENT_ID} characters")
    public_key, cert_signature = r.fixed(_KEY), r.fixed(_SIGNATURE)
    expires_at = None
    if flag == 2:
        expires_at = r.u64()
        if not 0 < expires_at <= MAX_EXPIRES_AT:
            raise InvalidMessage(f"a certificate expiry is in 1..{MAX_EXPIRES_AT}")
    certificate = IdentityCertificate(
        enrolment_id=enrolment_id,
        public_key=public_key,
        signature=cert_signature,
        expires_at=expires_at,
    )
    return certificate, r.fixed(_SIGNATURE)


def _put_advert(w: Writer, m: KeyAdvertisement) -> None:
    w.u64(m.node_id)
    w.fixed(m.enc_public, _KEY)
    w.fixed(m.mask_public, _KEY)
    w.fixed(m.self_mask_commitment, _KEY)
    w.ids(m.holders)
    w.fixed(m.setup_digest, _DIGEST)
    _put_signed(w, m.certificate, m.signature)


def _get_advert(r: Reader) -> KeyAdvertisement:
    node_id = r.u64()
    enc, mask, commitment = r.fixed(_KEY), r.fixed(_KEY), r.fixed(_KEY)
    holders, digest = r.distinct_ids(), r.fixed(_DIGEST)
    certificate, signature = _get_signed(r)
    return KeyAdvertisement(
        node_id=node_id,
        enc_public=enc,
        mask_public=mask,
        self_mask_commitment=commitment,
        holders=holders,
        setup_digest=digest,
        certificate=certificate,
        signature=signature,
    )


def _put_prekey(w: Writer, m: PreKey) -> None:
    w.u64(m.node_id)
    w.fixed(m.enc_public, _KEY)
    w.fixed(m.mask_public, _KEY)
    _put_signed(w, m.certificate, m.signature)


def _get_prekey(r: Reader) -> PreKey:
    node_id, enc, mask = r.u64(), r.fixed(_KEY), r.fixed(_KEY)
    certificate, signature = _get_signed(r)
    return PreKey(
        node_id=node_id,
        enc_public=enc,
        mask_public=mask,
        certificate=certificate,
        signature=signature,
    )


def prekey_list(prekeys: Sequence[PreKey]) -> bytes:
    """Return the wire form of a list of pre-keys (a :class:`PrekeyedSetup`'s second part).

    A server sends the same list to every participant: encode it once and pass
    it to :func:`encode_prekeyed_setup` for each (n participants, n^2 keys otherwise).
    """
    w = Writer()
    w.u32(len(prekeys))
    for prekey in prekeys:
        _put_prekey(w, prekey)
    return w.getvalue()


def _keyed_setup(kind: type[Any], setup: RoundSetup, prekeys: bytes) -> Writer:
    w = Writer()
    w.u8(_CODECS[kind][0])
    w.u8(_VERSION)
    _put_setup(w, setup)
    w.section(prekeys)
    return w


def encode_prekeyed_setup(setup: RoundSetup, prekeys: bytes) -> bytes:
    """Return the wire form of ``PrekeyedSetup(setup, ...)`` from :func:`prekey_list`'s bytes."""
    return _keyed_setup(PrekeyedSetup, setup, prekeys).getvalue()


def _put_prekeyed_setup(w: Writer, m: PrekeyedSetup) -> None:
    _put_setup(w, m.setup)
    w.section(prekey_list(m.prekeys))


def _get_prekeyed_setup(r: Reader) -> PrekeyedSetup:
    setup = _get_setup(r)
    inner = Reader(r.section())
    prekeys = tuple(_get_prekey(inner) for _ in range(inner.count()))
    inner.finish()
    nodes = [p.node_id for p in prekeys]
    if any(a >= b for a, b in itertools.pairwise(nodes)):
        raise InvalidMessage("pre-keys must be sorted by node id, one per node")
    return PrekeyedSetup(setup, prekeys)


def encode_graph_setup(
    setup: RoundSetup, prekeys: bytes, holders: Sequence[int], drawn_by: Sequence[int]
) -> bytes:
    """Return the wire form of a :class:`GraphSetup` from :func:`prekey_list`'s bytes."""
    w = _keyed_setup(GraphSetup, setup, prekeys)
    w.ids(holders)
    w.ids(drawn_by)
    return w.getvalue()


def _put_graph_setup(w: Writer, m: GraphSetup) -> None:
    _put_prekeyed_setup(w, PrekeyedSetup(m.setup, m.prekeys))
    w.ids(m.holders)
    w.ids(m.drawn_by)


def _get_graph_setup(r: Reader) -> GraphSetup:
    keyed = _get_prekeyed_setup(r)
    return GraphSetup(keyed.setup, keyed.prekeys, r.distinct_ids(), r.distinct_ids())


def _put_prekeyed_shares(w: Writer, m: PrekeyedShares) -> None:
    w.section(encode(m.advert))
    w.section(encode(m.shares))


def _get_prekeyed_shares(r: Reader) -> PrekeyedShares:
    advert = decode(r.section(), KeyAdvertisement)
    return PrekeyedShares(advert, decode(r.section(), EncryptedShares))


def _put_blobs(w: Writer, values: Mapping[int, bytes]) -> None:
    w.u32(len(values))
    for node in sorted(values):
        w.u64(node)
        w.blob(values[node])


def _get_blobs(r: Reader, size: int | None = None) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for _ in range(r.count()):
        node = r.u64()
        if node in out:
            raise InvalidMessage(f"two entries for node {node}")
        value = r.blob() if size is None else r.fixed(size)
        out[node] = value
    return out


def _put_share_keys(w: Writer, m: ShareKeysRequest) -> None:
    w.u32(len(m.adverts))
    for advert in m.adverts:
        _put_advert(w, advert)


def _get_share_keys(r: Reader) -> ShareKeysRequest:
    return ShareKeysRequest(tuple(_get_advert(r) for _ in range(r.count())))


def _put_encrypted(w: Writer, m: EncryptedShares) -> None:
    w.u64(m.node_id)
    _put_blobs(w, m.ciphertexts)


def _get_encrypted(r: Reader) -> EncryptedShares:
    return EncryptedShares(node_id=r.u64(), ciphertexts=_get_blobs(r))


def _put_masked_request(w: Writer, m: MaskedInputRequest) -> None:
    w.ids(m.partners)
    _put_blobs(w, m.ciphertexts)
    w.u32(len(m.adverts))
    for advert in m.adverts:
        _put_advert(w, advert)


def _get_masked_request(r: Reader) -> MaskedInputRequest:
    partners, ciphertexts = r.distinct_ids(), _get_blobs(r)
    adverts = tuple(_get_advert(r) for _ in range(r.count()))
    return MaskedInputRequest(partners, ciphertexts, adverts)


def _put_report(w: Writer, m: MaskedInputReport) -> None:
    w.u64(m.node_id)
    w.ids(m.rejected)


def _get_report(r: Reader) -> MaskedInputReport:
    return MaskedInputReport(node_id=r.u64(), rejected=r.distinct_ids())


def _put_signatures(w: Writer, values: Mapping[int, bytes]) -> None:
    w.u32(len(values))
    for node in sorted(values):
        w.u64(node)
        w.fixed(values[node], _SIGNATURE)


def _put_unmask_request(w: Writer, m: UnmaskRequest) -> None:
    w.ids(m.survivors)
    _put_signatures(w, m.signatures)
    _put_blobs(w, m.ciphertexts)


def _get_unmask_request(r: Reader) -> UnmaskRequest:
    return UnmaskRequest(r.distinct_ids(), _get_blobs(r, _SIGNATURE), _get_blobs(r))


def _put_unmask_response(w: Writer, m: UnmaskResponse) -> None:
    w.u64(m.node_id)
    w.shares(m.self_mask_shares)
    w.shares(m.mask_key_shares)
    w.u32(len(m.pairwise_seeds))
    for node in sorted(m.pairwise_seeds):
        w.u64(node)
        w.fixed(m.pairwise_seeds[node], _KEY)
    w.u32(len(m.pair_seed_shares))
    for owner in sorted(m.pair_seed_shares):
        w.u64(owner)
        w.shares(m.pair_seed_shares[owner])


def _get_unmask_response(r: Reader) -> UnmaskResponse:
    return UnmaskResponse(
        node_id=r.u64(),
        self_mask_shares=r.shares(),
        mask_key_shares=r.shares(),
        pairwise_seeds=_get_blobs(r, _KEY),
        pair_seed_shares=_get_pair_shares(r),
    )


def _get_pair_shares(r: Reader) -> dict[int, dict[int, npt.NDArray[np.uint32]]]:
    out: dict[int, dict[int, npt.NDArray[np.uint32]]] = {}
    for _ in range(r.count()):
        owner = r.u64()
        if owner in out:
            raise InvalidMessage(f"two entries for node {owner}")
        out[owner] = r.shares()
    return out


def _put_signature(w: Writer, m: ConsistencySignature) -> None:
    w.u64(m.node_id)
    w.fixed(m.signature, _SIGNATURE)


_Codec = tuple[int, Callable[[Writer, Any], None], Callable[[Reader], Any]]

_CODECS: dict[type[Any], _Codec] = {
    RoundSetup: (1, _put_setup, _get_setup),
    KeyAdvertisement: (2, _put_advert, _get_advert),
    ShareKeysRequest: (3, _put_share_keys, _get_share_keys),
    EncryptedShares: (4, _put_encrypted, _get_encrypted),
    MaskedInputRequest: (5, _put_masked_request, _get_masked_request),
    ConsistencyRequest: (
        6,
        lambda w, m: w.ids(m.survivors),
        lambda r: ConsistencyRequest(r.distinct_ids()),
    ),
    ConsistencySignature: (
        7,
        _put_signature,
        lambda r: ConsistencySignature(node_id=r.u64(), signature=r.fixed(_SIGNATURE)),
    ),
    UnmaskRequest: (8, _put_unmask_request, _get_unmask_request),
    UnmaskResponse: (9, _put_unmask_response, _get_unmask_response),
    MaskedInputReport: (10, _put_report, _get_report),
    PreKey: (11, _put_prekey, _get_prekey),
    PreKeyRequest: (12, lambda w, m: w.u64(m.node_id), lambda r: PreKeyRequest(r.u64())),
    PrekeyedSetup: (13, _put_prekeyed_setup, _get_prekeyed_setup),
    PrekeyedShares: (14, _put_prekeyed_shares, _get_prekeyed_shares),
    GraphSetup: (15, _put_graph_setup, _get_graph_setup),
}


def encode(message: object) -> bytes:
    """Return the wire form of a protocol message.

    Raises
    ------
    InvalidMessage
        If the message type has no codec or a field has the wrong size.
    """
    codec = _CODECS.get(type(message))
    if codec is None:
        raise InvalidMessage(f"no wire format for {type(message).__name__}")
    tag, put, _ = codec
    writer = Writer()
    writer.u8(tag)
    writer.u8(_VERSION)
    put(writer, message)
    return writer.getvalue()


def decode(data: bytes, kind: type[T]) -> T:
    """Parse ``data`` as a message of type ``kind``, validating every field.

    Raises
    ------
    InvalidMessage
        If the bytes are not exactly one well-formed ``kind`` message.
    """
    codec = _CODECS.get(kind)
    if codec is None:
        raise InvalidMessage(f"no wire format for {kind.__name__}")
    tag, _, get = codec
    reader = Reader(data)
    if reader.u8() != tag:
        raise InvalidMessage(f"not a {kind.__name__} message")
    if reader.u8() != _VERSION:
        raise InvalidMessage("unsupported protocol version")
    message = get(reader)
    reader.finish()
    return cast(T, message)
