"""Label Studio brush masks: the run-length format of its ``brushlabels`` results.

Label Studio stores a brush mask as an RGBA image of the task's size, flattened and packed with the
``rle-pack`` bit format: a 32-bit value count, a 5-bit word size minus one, four 4-bit run-length
field sizes minus one, then chunks of ``[repeat bit][2-bit size index][run length - 1][value(s)]``.
The painted pixels have a non-zero alpha channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_WORD = 8
_RLE_SIZES = (3, 4, 8, 16)


class _Bits:
    def __init__(self, data: Sequence[int]) -> None:
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
        self.i = 0

    def read(self, n: int) -> int:
        if self.i + n > len(self.bits):
            raise ValueError("brush RLE ends early")
        chunk = self.bits[self.i : self.i + n]
        self.i += n
        return int(chunk.dot(1 << np.arange(n - 1, -1, -1, dtype=np.int64))) if n else 0


def decode_rle(rle: Sequence[int]) -> np.ndarray:
    """Label Studio RLE -> uint8 [count] (for a brush: RGBA values of a H x W image, flattened)."""
    bits = _Bits(rle)
    num = bits.read(32)
    word = bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8)
    i = 0
    while i < num:
        repeat = bits.read(1)
        j = i + 1 + bits.read(sizes[bits.read(2)])
        if j > num:
            raise ValueError(f"brush RLE run past its declared length {num}")
        if repeat:
            out[i:j] = bits.read(word)
            i = j
        else:
            while i < j:
                out[i] = bits.read(word)
                i += 1
    return out


def encode_rle(values: np.ndarray) -> list[int]:
    """uint8 [count] -> Label Studio RLE bytes (runs only; readable by Label Studio's decoder)."""
    flat = np.asarray(values, dtype=np.uint8).ravel()
    out: list[str] = [f"{len(flat):032b}", f"{_WORD - 1:05b}", *(f"{s - 1:04b}" for s in _RLE_SIZES)]
    if len(flat):
        change = np.flatnonzero(np.diff(flat)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(flat)]])
        longest = 1 << _RLE_SIZES[-1]
        for start, end, value in zip(starts, ends, flat[starts]):
            length = int(end - start)
            while length > 0:
                run = min(length, longest)
                idx = next(k for k, s in enumerate(_RLE_SIZES) if run - 1 < (1 << s))
                out.append(f"1{idx:02b}{run - 1:0{_RLE_SIZES[idx]}b}{int(value):08b}")
                length -= run
    bits = "".join(out)
    bits += "0" * (-len(bits) % 8)
    return np.packbits(np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")).tolist()


def mask_to_brush(region: np.ndarray) -> list[int]:
    """bool [H, W] region -> RLE of an RGBA image that is opaque white on the region."""
    rgba = np.repeat(region.astype(np.uint8)[:, :, None] * 255, 4, axis=2)
    return encode_rle(rgba.ravel())


def brush_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """RLE of an RGBA brush image -> bool [H, W] (alpha > 0)."""
    values = decode_rle(rle)
    if values.size != height * width * 4:
        raise ValueError(
            f"brush RLE holds {values.size} values; a {height}x{width} RGBA image needs {height * width * 4}"
        )
    return values.reshape(height, width, 4)[:, :, 3] > 0
