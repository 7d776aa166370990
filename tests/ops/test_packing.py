"""Sub-byte packing: the documented little-endian bit stream, byte for byte."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import linquant as lq
from linquant.ops.packing import pack, pack_into, packed_nbytes, unpack

BITS = list(range(2, 9))
LENGTHS = [1, 2, 7, 8, 9, 13, 64, 1001]


def u8(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def stream_pack(codes: list[int], bits: int) -> list[int]:
    """The documented rule, one bit at a time: code i bit k is stream bit i*bits+k, stream bit
    j is bit j % 8 of byte j // 8."""
    out = [0] * math.ceil(len(codes) * bits / 8)
    for i, c in enumerate(codes):
        for k in range(bits):
            j = i * bits + k
            out[j // 8] |= ((c >> k) & 1) << (j % 8)
    return out


# Byte layouts written out by hand from the docstring of linquant.ops.packing.
HAND_LAYOUTS = {
    # 2 bits: byte k holds codes 4k..4k+3 from the low bits up.
    "2bit-one-byte": (2, [1, 2, 3, 0], [0b00_11_10_01]),
    "2bit-odd-length": (2, [1, 2, 3, 0, 3], [0b00_11_10_01, 0b00_00_00_11]),
    "2bit-single": (2, [2], [0b10]),
    # 3 bits: codes straddle bytes. [5,3,7,1,6,0,2,4] -> stream bits (LSB first)
    # 101 110 111 100 011 000 010 001 -> bytes 0xDD, 0x63, 0x88.
    "3bit-eight-codes": (3, [5, 3, 7, 1, 6, 0, 2, 4], [0xDD, 0x63, 0x88]),
    "3bit-straddle": (3, [0, 0, 7], [0b1100_0000, 0b0000_0001]),
    "3bit-all-ones-odd": (3, [7, 7, 7], [0xFF, 0x01]),
    # 4 bits: low nibble = code 2k, high nibble = code 2k+1.
    "4bit-pairs": (4, [0x1, 0x2, 0xF, 0x0], [0x21, 0x0F]),
    "4bit-odd-length": (4, [0x1, 0x2, 0xF, 0x0, 0x7], [0x21, 0x0F, 0x07]),
    # 5 bits: [31, 1] -> bits 0..4 set, then bit 5 -> 0x3F, second byte empty (10 bits).
    "5bit-two-codes": (5, [31, 1], [0x3F, 0x00]),
    "5bit-straddle": (5, [0, 31], [0xE0, 0x03]),
    # 6 bits: 1 -> bit 0; 2 -> bit 7; 3 -> bits 12,13; 63 -> bits 18..23.
    "6bit-four-codes": (6, [1, 2, 3, 63], [0x81, 0x30, 0xFC]),
    # 7 bits: second code starts at bit 7.
    "7bit-two-codes": (7, [127, 0], [0x7F, 0x00]),
    "7bit-straddle": (7, [0, 127], [0x80, 0x3F]),
    # 8 bits: the bytes are the codes.
    "8bit-identity": (8, [0, 127, 128, 255, 1], [0, 127, 128, 255, 1]),
}


@pytest.mark.parametrize(("bits", "codes", "expected"), list(HAND_LAYOUTS.values()),
                         ids=list(HAND_LAYOUTS))
def test_hand_written_layout(bits: int, codes: list[int], expected: list[int]) -> None:
    assert stream_pack(codes, bits) == expected  # the helper agrees with the hand layout
    packed = pack(u8(codes), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert unpack(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_matches_bit_stream_rule(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.tolist() == stream_pack(codes.tolist(), bits)


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_round_trip_and_size(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(7 * bits + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (packed_nbytes(n, bits),)
    assert packed.numel() == math.ceil(n * bits / 8)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)
    # unused high bits of the last byte are zero
    used = n * bits - 8 * (packed.numel() - 1)
    assert int(packed[-1]) >> used == 0


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_extreme_codes_round_trip(bits: int) -> None:
    top = 2**bits - 1
    for codes in ([top] * 13, [0] * 13, [top, 0] * 6 + [top]):
        packed = pack(u8(codes), bits)
        assert unpack(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_pack_into_matches_pack(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (37,), dtype=torch.uint8)
    out = torch.full((packed_nbytes(37, bits),), 0xAA, dtype=torch.uint8)
    pack_into(codes, bits, out)
    assert torch.equal(out, pack(codes, bits))


def test_pack_flattens_row_major() -> None:
    codes = torch.arange(12, dtype=torch.uint8).reshape(3, 4) % 16
    assert torch.equal(pack(codes, 4), pack(codes.reshape(-1), 4))
    assert pack(codes, 4).tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_eight_codes_fill_bits_bytes_independently(bits: int) -> None:
    """Every 8 codes fill exactly `bits` bytes: runs of 8k codes pack independently."""
    codes = torch.randint(0, 2**bits, (40,), dtype=torch.uint8)
    joined = torch.cat([pack(codes[:16], bits), pack(codes[16:], bits)])
    assert torch.equal(joined, pack(codes, bits))
    assert pack(codes[:8], bits).numel() == bits


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_unpack_reads_prefix_only(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (24,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, 5), codes[:5])


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_zero_codes(bits: int) -> None:
    empty = torch.zeros(0, dtype=torch.uint8)
    packed = pack(empty, bits)
    assert packed.numel() == 0
    assert unpack(packed, bits, 0).numel() == 0
    assert unpack(pack(u8([1]), bits), bits, 0).numel() == 0


def test_packed_nbytes_table() -> None:
    for bits in BITS:
        for n in [0, 1, 2, 3, 7, 8, 9, 13, 1001, 4096 * 4096]:
            assert packed_nbytes(n, bits) == -(-n * bits // 8) == math.ceil(n * bits / 8)
    assert packed_nbytes(1, 3) == 1
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(1001, 4) == 501
    assert packed_nbytes(1001, 3) == 376


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[int, list[int]]:
    bits = draw(st.integers(2, 8))
    codes = draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=300))
    return bits, codes


@given(codes_and_bits())
def test_round_trip_property(case: tuple[int, list[int]]) -> None:
    bits, codes = case
    packed = pack(u8(codes), bits)
    assert packed.numel() == packed_nbytes(len(codes), bits)
    assert packed.tolist() == stream_pack(codes, bits)
    assert unpack(packed, bits, len(codes)).tolist() == codes


# ---- the stored code convention of QuantizedTensor ------------------------------------------

def test_symmetric_int4_two_complement_bytes() -> None:
    # max |x| = 7 -> s = 1 exactly; codes are the values themselves
    x = torch.tensor([-7.0, -1.0, 0.0, 1.0, 7.0, 3.0, -2.0])
    qt = lq.quantize(x, "int4-sym-tensor-fp32")
    assert float(qt.scale) == 1.0
    assert qt.codes().tolist() == [-7, -1, 0, 1, 7, 3, -2]
    # -7 = 0b1001, -1 = 0b1111, -2 = 0b1110 (4-bit two's complement)
    assert qt.qdata.tolist() == [0xF9, 0x10, 0x37, 0x0E]


def test_symmetric_int3_two_complement_bytes() -> None:
    x = torch.tensor([-3.0, 3.0, -1.0])  # s = 1, codes -3, 3, -1 -> 0b101, 0b011, 0b111
    qt = lq.quantize(x, "int3-sym-tensor-fp32")
    assert qt.qdata.tolist() == stream_pack([0b101, 0b011, 0b111], 3) == [0xDD, 0x01]


def test_symmetric_int8_bytes_are_int8() -> None:
    x = torch.tensor([-127.0, -1.0, 0.0, 5.0, 127.0])
    qt = lq.quantize(x, "int8-sym-tensor-fp32")
    assert torch.equal(qt.qdata.view(torch.int8), x.to(torch.int8))


def test_asymmetric_codes_and_zero_point_unsigned() -> None:
    # lo = -1, hi = 2 -> s = 3/15 = 0.2 (fp32), z = round(1/0.2) = 5
    x = torch.tensor([[-1.0, 0.0, 2.0, 1.0]])
    qt = lq.quantize(x, "int4-asym-tensor-fp32")
    assert qt.codes().dtype == torch.uint8
    assert int(qt.zero_point) == 5  # type: ignore[arg-type]
    assert qt.codes().tolist() == [[0, 5, 15, 10]]
    assert qt.qdata.tolist() == [0x50, 0xAF]
    assert qt.zero_point_packed is not None
    assert qt.zero_point_packed.tolist() == [5]


def test_zero_points_packed_at_code_width() -> None:
    x = torch.randn(8, 6)
    x[:, 0] = -torch.arange(1, 9, dtype=torch.float32)  # distinct negative minimum per row
    qt = lq.quantize(x, "int3-asym-ch0-fp32")
    zp = qt.zero_point
    assert zp is not None and zp.shape == (8, 1) and zp.dtype == torch.uint8
    assert qt.zero_point_packed is not None
    assert qt.zero_point_packed.tolist() == stream_pack(zp.reshape(-1).tolist(), 3)
    assert qt.zero_point_packed.numel() == 3
