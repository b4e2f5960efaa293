"""The codec of calls: plain values copied, large payloads moved through the
heap and read in place by the callee, blocks owned and freed by the right
side, and a clear error for what cannot be sent."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llmasos
from conftest import unique_name
from llmasos.codec import LARGE, Decoder, Encoder, prepare
from llmasos.errors import InvalidHandle

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=64),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=8) | st.integers(-100, 100), inner, max_size=5
        )
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def shared() -> Iterator[llmasos.Heap]:
    heap = llmasos.Heap.create(64 << 20, name=unique_name("codec"))
    yield heap
    heap.destroy()


@settings(max_examples=200, deadline=None)
@given(value=plain)
def test_plain_values_round_trip(shared: llmasos.Heap, value: object) -> None:
    enc = Encoder(shared)

    assert Decoder(shared).unpack(enc.pack([1, value])) == [1, value]
    assert enc.made == []


def test_tuples_sets_dataclasses_and_datetimes_arrive_as_documented(
    heap: llmasos.Heap,
) -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    aware = datetime.datetime(2026, 12, 3, 9, 30, tzinfo=datetime.UTC)
    naive = datetime.datetime(2026, 12, 3, 9, 30)
    data = Encoder(heap).pack([(1, 2), {3}, Point(4, 5), aware, naive])

    assert Decoder(heap).unpack(data) == [
        [1, 2],
        [3],
        {"x": 4, "y": 5},
        aware,
        "2026-12-03T09:30:00",
    ]


def test_large_bytes_argument_is_read_in_place_from_one_block(
    heap: llmasos.Heap,
) -> None:
    payload = bytes(range(256)) * (LARGE // 256)
    enc = Encoder(heap)

    data = enc.pack([prepare(payload)])
    (seen,) = Decoder(heap).unpack(data)

    assert len(data) < 64
    assert isinstance(seen, memoryview) and seen.readonly
    assert seen == payload
    (block,) = enc.made
    with memoryview(block) as view:
        assert view[: len(payload)] == payload
    del seen
    heap.free(block)
    assert heap.stats().blocks == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_prepare_marks_large_bytes_likes_only(kind: type) -> None:
    small, large = kind(b"x" * (LARGE - 1)), kind(b"x" * LARGE)

    assert prepare(small) is small
    assert prepare(large) is not large
    assert prepare("x" * LARGE) == "x" * LARGE


def test_reply_decoder_copies_large_bytes_out_and_frees_the_block(
    heap: llmasos.Heap,
) -> None:
    payload = b"y" * (2 * LARGE)
    data = Encoder(heap).pack([7, True, prepare(payload)])

    got = Decoder(heap, reply=True).unpack(data)

    assert got == [7, True, payload]
    assert isinstance(got[2], bytes)
    assert heap.stats().blocks == 0


def test_buffer_travels_by_handle_and_a_reply_hands_it_over(
    heap: llmasos.Heap,
) -> None:
    buf = heap.malloc(1 << 20)
    with memoryview(buf) as view:
        view[:5] = b"hello"
    enc = Encoder(heap)

    (lent,) = Decoder(heap).unpack(enc.pack([buf]))
    (owned,) = Decoder(heap, reply=True).unpack(enc.pack([buf]))

    assert lent.handle == owned.handle == buf.handle
    with memoryview(owned) as view:
        assert view[:5] == b"hello"
    assert enc.made == []


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(64, dtype=np.int64).reshape(8, 8)[:, ::2],  # not contiguous
        np.zeros((0, 3), dtype=np.uint8),
    ],
    ids=["2d", "strided", "empty"],
)
def test_numpy_arrays_keep_dtype_shape_and_values(
    heap: llmasos.Heap, arr: np.ndarray
) -> None:
    enc = Encoder(heap)

    (lent,) = Decoder(heap).unpack(enc.pack([arr]))
    np.testing.assert_array_equal(lent, arr)
    assert lent.dtype == arr.dtype
    del lent
    (copied,) = Decoder(heap, reply=True).unpack(enc.pack([arr]))

    np.testing.assert_array_equal(copied, arr)
    assert copied.dtype == arr.dtype and copied.flags.writeable


def test_unsupported_value_is_a_type_error_naming_its_type(
    heap: llmasos.Heap,
) -> None:
    class Widget:
        pass

    with pytest.raises(TypeError, match="cannot send a Widget between services"):
        Encoder(heap).pack([Widget()])


def test_buffer_of_another_heap_is_refused(
    make_heap: Callable[..., llmasos.Heap], heap: llmasos.Heap
) -> None:
    other = make_heap()
    buf = other.malloc(64)

    with pytest.raises(InvalidHandle, match="allocate it with llmasos.malloc"):
        Encoder(heap).pack([buf])


def test_malformed_message_is_a_decode_error(heap: llmasos.Heap) -> None:
    from llmasos.codec import DecodeError

    with pytest.raises(DecodeError):
        Decoder(heap).unpack(b"\xc1")
