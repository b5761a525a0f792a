"""The runtime's documented noise generator: counter-based, so any host language can reproduce it bit for bit.

Every Gaussian the runtime draws is a pure function of (seed, image index, draw, element index):

    splitmix64(z):  z += 0x9E3779B97F4A7C15 (mod 2^64)
                    z  = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
                    z  = (z ^ (z >> 27)) * 0x94D049BB133111EB
                    return z ^ (z >> 31)
    key(seed, image, draw) = splitmix64(splitmix64(seed) ^ (image * 256 + draw))
    U(key, i)  = ((splitmix64(key + i) >> 11) + 0.5) / 2^53             uniform in (0, 1)
    element 2j and 2j+1 of a draw (Box-Muller, float64, then rounded to float32):
        r = sqrt(-2 ln U(key, 2j));  z[2j] = r cos(2 pi U(key, 2j+1));  z[2j+1] = r sin(2 pi U(key, 2j+1))

Draw 0 of an image is its starting noise; draw k (k >= 1) is the fresh noise DMD2's loop adds before step k.
`image` counts from 0 over a whole request, so results do not depend on how a request is split into batches.
Elements are in C order of the image's (C, H, W) array.
"""

import math

import numpy as np

from . import native

GOLDEN = 0x9E3779B97F4A7C15
MAX_DRAWS = 256


def splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (numpy wraps uint64 arithmetic modulo 2^64)."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=np.uint64) + np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def splitmix64_int(z: int) -> int:
    """splitmix64 on one Python int (the seed's own mix: cheaper than a numpy scalar on the per-request path)."""
    mask = 2**64 - 1
    z = (z + GOLDEN) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def normals(seed: int, ids: np.ndarray, count: int) -> np.ndarray:
    """float32 (*ids.shape, count): `count` elements of each draw id = image * MAX_DRAWS + draw, all at once."""
    pairs = (count + 1) // 2
    ids = np.asarray(ids, dtype=np.uint64)
    mix = splitmix64_int(seed % 2**64)
    if ids.size <= 16:  # a small request: its keys in Python ints beat a dozen numpy calls on a tiny array
        keys = np.array([splitmix64_int(mix ^ int(i)) for i in ids.flat], dtype=np.uint64).reshape(ids.shape)
    else:
        keys = splitmix64(np.uint64(mix) ^ ids)
    bits = splitmix64(keys[..., None] + np.arange(2 * pairs, dtype=np.uint64))
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    r = np.sqrt(-2.0 * np.log(u[..., 0::2]))
    angle = 2.0 * np.pi * u[..., 1::2]
    z = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=-1).reshape(*keys.shape, 2 * pairs)[..., :count]
    return z.astype(np.float32)


def gaussian(seed: int, image: int, draw: int, shape: tuple[int, ...]) -> np.ndarray:
    """One draw of unit Gaussian noise (float32, `shape`) for one image of a request."""
    if not 0 <= draw < MAX_DRAWS:
        raise ValueError(f"draw must lie in 0..{MAX_DRAWS - 1}")
    if not 0 <= image < 2**56:
        raise ValueError("image indices must lie in 0..2^56 - 1")
    return normals(seed, np.array(image * MAX_DRAWS + draw), int(np.prod(shape))).reshape(shape)


def request_noise(seed: int, start: int, count: int, draws: int, shape: tuple[int, ...]) -> np.ndarray:
    """(count, draws, *shape) float32: every draw of images start..start+count-1 of a request, in one pass (the
    same numbers as gaussian() image by image and draw by draw)."""
    if not 0 <= draws <= MAX_DRAWS:
        raise ValueError(f"draws must lie in 0..{MAX_DRAWS}")
    if start < 0 or (start + count) * MAX_DRAWS > 2**64:
        raise ValueError("image indices must lie in 0..2^56 - 1")
    size = math.prod(shape)
    if native.lib is not None:  # the same loop in C (runtime/_native.c): one call instead of ~30 small array ops
        out = np.empty((count, draws, *shape), np.float32)
        native.lib.noise(seed % 2**64, start, count, draws, size, out)
        return out
    ids = np.arange(start, start + count, dtype=np.uint64)[:, None] * np.uint64(MAX_DRAWS) \
        + np.arange(draws, dtype=np.uint64)[None, :]
    return normals(seed, ids, size).reshape(count, draws, *shape)
