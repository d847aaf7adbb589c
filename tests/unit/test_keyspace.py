"""storage.keyspace: the on-disk codecs of value records, apply results, request ids and
replica meta, and the expiry rule.

Pure: bytes in, bytes out. Hypothesis prints the falsifying example.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.errors import Version
from storage.keyspace import (
    NODE_CLUSTER,
    NODE_ID,
    NODE_INCARNATION,
    ApplyResult,
    Outcome,
    ReplicaMeta,
    ValueRecord,
    decode_meta,
    decode_record,
    decode_result,
    encode_meta,
    encode_record,
    encode_result,
    meta_key,
    record_version,
    request_applied_at,
    request_key,
)

U64 = st.integers(0, 2**64 - 1)
versions = st.builds(Version, U64, U64)
RECORD_HEADER = 24  # epoch, index, expires_at_ms: three big-endian u64


# -- value records ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(epoch=U64, index=U64, expires=U64, value=st.binary(max_size=64))
def test_record_round_trip(epoch: int, index: int, expires: int, value: bytes) -> None:
    raw = encode_record(epoch, index, expires, value)
    assert len(raw) == RECORD_HEADER + len(value)
    assert decode_record(raw) == ValueRecord(Version(epoch, index), expires, value)
    assert record_version(raw) == (epoch, index, expires)


def test_record_layout_is_fixed_big_endian() -> None:
    """Replicas compare records byte for byte: the layout is part of the format."""
    raw = encode_record(3, 1042, 7, b"v")
    assert raw == struct.pack(">QQQ", 3, 1042, 7) + b"v"
    assert raw == encode_record(3, 1042, 7, b"v")


def test_record_with_an_empty_value() -> None:
    raw = encode_record(1, 2, 0, b"")
    assert len(raw) == RECORD_HEADER
    assert decode_record(raw) == ValueRecord(Version(1, 2), 0, b"")


def test_record_value_may_look_like_a_header() -> None:
    value = encode_record(9, 9, 9, b"inner")
    assert decode_record(encode_record(1, 2, 3, value)).value == value


def test_record_version_ignores_the_value() -> None:
    assert record_version(encode_record(4, 5, 6, b"x" * 10_000)) == (4, 5, 6)
    assert record_version(encode_record(4, 5, 6, b"")) == (4, 5, 6)


def test_truncated_record_is_refused() -> None:
    with pytest.raises(struct.error):
        decode_record(b"\x00" * (RECORD_HEADER - 1))
    with pytest.raises(struct.error):
        record_version(b"")


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_record_fields_out_of_range_are_refused(bad: int) -> None:
    with pytest.raises(struct.error):
        encode_record(bad, 1, 0, b"")
    with pytest.raises(struct.error):
        encode_record(1, 1, bad, b"")


def test_versions_order_the_same_as_the_log() -> None:
    """Records of later writes sort after earlier ones on (epoch, index) in bytes too."""
    positions = [(1, 5), (1, 300), (2, 1), (2, 2), (256, 0)]
    raws = [encode_record(e, i, 0, b"") for e, i in positions]
    assert sorted(raws) == raws


# -- expiry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expires_at_ms", "now_ms", "live"),
    [
        (0, 0, True),  # 0: never expires
        (0, 2**63, True),
        (1000, 999, True),
        (1000, 1000, False),  # "not after the instant" is absent: the boundary is dead
        (1000, 1001, False),
        (1, 0, True),
    ],
)
def test_live_at(expires_at_ms: int, now_ms: int, live: bool) -> None:
    record = decode_record(encode_record(1, 1, expires_at_ms, b"v"))
    assert record.live_at(now_ms) is live


@settings(max_examples=200, deadline=None)
@given(expires=U64, now=U64)
def test_live_exactly_when_without_expiry_or_expiring_after_now(expires: int, now: int) -> None:
    record = ValueRecord(Version(1, 1), expires, b"")
    assert record.live_at(now) == (expires == 0 or now < expires)


@settings(max_examples=100, deadline=None)
@given(expires=st.integers(1, 2**63), earlier=st.integers(0, 2**63), later=st.integers(0, 2**63))
def test_once_expired_a_record_stays_expired(expires: int, earlier: int, later: int) -> None:
    record = ValueRecord(Version(1, 1), expires, b"")
    earlier, later = sorted((earlier, later))
    if not record.live_at(earlier):
        assert not record.live_at(later)


# -- apply results (the request-id table's values) --------------------------------------


results = st.builds(
    ApplyResult,
    outcome=st.sampled_from(Outcome),
    version=versions,
    existed=st.booleans(),
    current=st.none() | versions,
    applied_at_ms=U64,
)


@settings(max_examples=100, deadline=None)
@given(results)
def test_result_round_trip(result: ApplyResult) -> None:
    raw = encode_result(result)
    assert decode_result(raw) == result
    assert request_applied_at(raw) == result.applied_at_ms
    assert len(raw) == len(encode_result(ApplyResult(Outcome.OK, Version(0, 0))))


def test_result_keeps_a_current_version_of_zero_apart_from_absent() -> None:
    """A CAS mismatch against version 0.0 is not a mismatch against an absent key."""
    found = ApplyResult(Outcome.CAS_MISMATCH, Version(2, 9), current=Version(0, 0))
    absent = ApplyResult(Outcome.CAS_MISMATCH, Version(2, 9), current=None)
    assert decode_result(encode_result(found)).current == Version(0, 0)
    assert decode_result(encode_result(absent)).current is None
    assert encode_result(found) != encode_result(absent)


def test_result_defaults_round_trip() -> None:
    result = ApplyResult(Outcome.OK, Version(5, 6))
    decoded = decode_result(encode_result(result))
    assert decoded == result
    assert (decoded.existed, decoded.current, decoded.applied_at_ms) == (False, None, 0)
    assert isinstance(decoded.outcome, Outcome)


def test_result_of_the_wrong_length_is_refused() -> None:
    raw = encode_result(ApplyResult(Outcome.OK, Version(5, 6)))
    with pytest.raises(struct.error):
        decode_result(raw[:-1])
    with pytest.raises(struct.error):
        decode_result(raw + b"\x00")


def test_result_with_an_unknown_outcome_is_refused() -> None:
    raw = bytearray(encode_result(ApplyResult(Outcome.OK, Version(5, 6))))
    raw[0] = 7
    with pytest.raises(ValueError):
        decode_result(bytes(raw))


# -- request ids -----------------------------------------------------------------------


client_ids = st.binary(min_size=0, max_size=20)


@settings(max_examples=200, deadline=None)
@given(a=st.tuples(client_ids, U64), b=st.tuples(client_ids, U64))
def test_request_keys_differ_for_different_requests(
    a: tuple[bytes, int], b: tuple[bytes, int]
) -> None:
    assert (request_key(*a) == request_key(*b)) == (a == b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((b"ab", 1), (b"a", 1)),
        ((b"a\x00", 1), (b"a", 1)),  # a client id that ends in what looks like a seq byte
        ((b"a", 256), (b"a\x00", 1)),
        ((b"", 0), (b"\x00", 0)),
        ((b"c", 0), (b"c", 1)),
        ((b"c", 2**64 - 1), (b"c\xff", 2**64 - 1)),
    ],
)
def test_request_keys_of_near_miss_pairs_differ(
    a: tuple[bytes, int], b: tuple[bytes, int]
) -> None:
    assert request_key(*a) != request_key(*b)


def test_request_key_is_stable_and_ends_in_the_big_endian_seq() -> None:
    key = request_key(b"client-7", 1042)
    assert key == request_key(b"client-7", 1042)
    assert key == b"client-7" + (1042).to_bytes(8, "big")


def test_request_keys_of_one_client_sort_by_seq() -> None:
    seqs = [0, 1, 255, 256, 2**32, 2**64 - 1]
    assert sorted(request_key(b"c", s) for s in seqs) == [request_key(b"c", s) for s in seqs]


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_request_key_refuses_an_out_of_range_seq(bad: int) -> None:
    with pytest.raises(struct.error):
        request_key(b"c", bad)


# -- replica meta ----------------------------------------------------------------------


metas = st.builds(ReplicaMeta, promised_epoch=U64, commit_index=U64, applied_index=U64,
                  base_epoch=U64, base_index=U64)


@settings(max_examples=200, deadline=None)
@given(metas)
def test_meta_round_trip(meta: ReplicaMeta) -> None:
    raw = encode_meta(meta)
    assert len(raw) == 40
    assert decode_meta(raw) == meta


def test_meta_defaults_round_trip_as_zeros() -> None:
    assert encode_meta(ReplicaMeta()) == b"\x00" * 40
    assert decode_meta(b"\x00" * 40) == ReplicaMeta()


def test_meta_field_order_is_fixed() -> None:
    meta = ReplicaMeta(promised_epoch=1, commit_index=2, applied_index=3, base_epoch=4,
                       base_index=5)
    assert encode_meta(meta) == struct.pack(">QQQQQ", 1, 2, 3, 4, 5)


def test_truncated_meta_is_refused() -> None:
    with pytest.raises(struct.error):
        decode_meta(b"\x00" * 39)


@settings(max_examples=100, deadline=None)
@given(a=st.integers(0, 2**32 - 1), b=st.integers(0, 2**32 - 1))
def test_meta_keys_are_distinct_fixed_width_and_ordered(a: int, b: int) -> None:
    ka, kb = meta_key(a), meta_key(b)
    assert len(ka) == 5
    assert ka.startswith(b"p")
    assert (ka == kb) == (a == b)
    assert (ka < kb) == (a < b)


def test_meta_keys_do_not_collide_with_node_keys() -> None:
    node_keys = {NODE_CLUSTER, NODE_ID, NODE_INCARNATION}
    assert len(node_keys) == 3
    for p in (0, 1, 0x6F64652F, 2**32 - 1):  # 0x6F64652F spells b"ode/"
        assert meta_key(p) not in node_keys
