"""Synthetic H&E-like tissue tiles: the project's embedded demo data set.

The pipeline needs a small image-classification set that ships with the code, so the demo,
the tests and CI never download anything. The tiles imitate haematoxylin & eosin
histopathology: pink eosin-stained stroma with wavy collagen fibres, purple
haematoxylin-stained nuclei, white tissue gaps. Stain amounts are painted as optical
densities and turned into RGB by Beer-Lambert absorption, as a real stain would be, so stain
and brightness can vary per tile the way they vary between slides.

The classes differ the way tissue classes do (nucleus density, size and irregularity,
small dense inflammatory cells, gland rings, pale necrotic areas with nuclear debris), but
their parameter ranges overlap and every tile draws its own stain, brightness and noise:
colour statistics separate the classes only partly, and a CNN has texture to learn from.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage, special

CLASSES: tuple[str, ...] = ("normal", "inflamed", "tumor", "necrotic")

# Per-class (low, high) ranges, each tile draws uniformly within them. Counts are per
# 64x64 field, lengths in pixels of a 64 px tile: a larger image_size is the same field of
# view sampled more finely, so tiles of every size look alike.
_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "normal": dict(
        nuclei=(8, 22),
        radius=(2.2, 3.0),
        irregular=(0.0, 0.15),
        lymph=(0, 6),
        debris=(0, 3),
        necrosis=(0.0, 0.15),
        glands=(0, 2.5),
        stain=(0.7, 1.0),
    ),
    "inflamed": dict(
        nuclei=(6, 18),
        radius=(2.2, 3.2),
        irregular=(0.05, 0.2),
        lymph=(15, 45),
        debris=(0, 8),
        necrosis=(0.0, 0.2),
        glands=(0, 1.2),
        stain=(0.75, 1.05),
    ),
    "tumor": dict(
        nuclei=(16, 36),
        radius=(2.8, 4.2),
        irregular=(0.12, 0.35),
        lymph=(0, 10),
        debris=(0, 8),
        necrosis=(0.0, 0.3),
        glands=(0, 1.2),
        stain=(0.95, 1.3),
    ),
    "necrotic": dict(
        nuclei=(3, 16),
        radius=(2.2, 3.6),
        irregular=(0.1, 0.35),
        lymph=(0, 12),
        debris=(12, 45),
        necrosis=(0.3, 0.75),
        glands=(0, 0.5),
        stain=(0.55, 0.95),
    ),
}
# Optical-density colours of the two stains (Macenko's reference H&E), jittered per tile.
_HAEMATOXYLIN = np.array([0.56, 0.72, 0.41])
_EOSIN = np.array([0.22, 0.80, 0.56])


def generate(out_dir: Path, n_per_class: int, image_size: int, seed: int) -> dict[str, int]:
    """Write the demo set as out_dir/<class>/<class>_<index:04d>.png; return images per class.

    Same arguments give byte-identical files. PNGs left in the class folders by an earlier
    call are removed first, so the folders hold exactly this set; nothing else is touched.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    counts = {}
    for class_idx, name in enumerate(CLASSES):
        class_dir = Path(out_dir) / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for stale in class_dir.glob(f"{name}_*.png"):
            stale.unlink()
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, class_idx, i])
            pixels = render_tile(name, image_size, rng)
            Image.fromarray(pixels, "RGB").save(
                class_dir / f"{name}_{i:04d}.png", format="PNG", compress_level=6
            )
        counts[name] = n_per_class
    return counts


def render_tile(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size, 3) tile of class `name`."""
    p = {key: rng.uniform(*bounds) for key, bounds in _PARAMS[name].items()}
    scale = size / 64
    area = scale**2
    eosin = _stroma(size, scale, rng)
    necrotic = _blob_mask(size, 6 * scale, p["necrosis"], rng)
    haem = np.zeros((size, size))

    r, s = p["radius"] * scale, p["stain"]
    _scatter(
        haem,
        p["nuclei"] * area,
        (r - 0.5 * scale, r + 0.5 * scale),
        (0, 0.35),
        p["irregular"],
        (0.85 * s, 1.15 * s),
        rng,
    )
    for _ in range(rng.poisson(p["glands"] * area)):
        _gland(haem, eosin, scale, rng)
    # Lymphocytes: small, round, dark.
    _scatter(haem, p["lymph"] * area, (1.1 * scale, 1.6 * scale), (0, 0.1), 0.03, (1.2, 1.5), rng)
    # Necrosis: eosin pales, nuclei fade to ghosts, and fragments of chromatin are left behind.
    eosin *= 1 - 0.6 * necrotic
    haem *= 1 - 0.7 * necrotic
    _scatter(haem, p["debris"] * area, (0.5 * scale, 1.0 * scale), (0, 0.3), 0.1, (0.9, 1.4), rng)

    chromatin = 1 + 0.25 * _smooth_noise(size, 0.6 * scale, rng)
    eosin += 0.25 * ndimage.gaussian_filter(haem, 2 * scale)  # cytoplasm around cells
    return _to_rgb(haem * chromatin, eosin, rng)


def _scatter(
    haem: np.ndarray,
    mean_count: float,
    radius: tuple[float, float],
    elongation: tuple[float, float],
    irregularity: float,
    strength: tuple[float, float],
    rng: np.random.Generator,
) -> None:
    """Paint a Poisson number of blobs at random places, sizes drawn from (low, high) ranges."""
    size, n = haem.shape[0], rng.poisson(mean_count)
    centres = rng.uniform(-2, size + 2, (n, 2))
    _stamp(
        haem,
        centres,
        rng.uniform(*radius, n),
        rng.uniform(*elongation, n),
        irregularity,
        rng.uniform(*strength, n),
        rng,
    )


def _stroma(size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Eosin density of connective tissue: wavy collagen fibres with white gaps."""
    yy, xx = np.mgrid[0:size, 0:size] / scale
    angle = rng.uniform(0, np.pi)
    warp = 5 * _smooth_noise(size, 8 * scale, rng)
    phase = rng.uniform(0.5, 1.2) * (xx * np.cos(angle) + yy * np.sin(angle)) + warp
    fibres = 0.5 + 0.5 * np.sin(phase)
    mottle = 1 + 0.2 * _smooth_noise(size, 3 * scale, rng)
    density = rng.uniform(0.35, 0.6) * (0.7 + 0.3 * fibres) * mottle
    gaps = _blob_mask(size, 5 * scale, rng.uniform(0.0, 0.15), rng)
    return density * (1 - 0.9 * gaps)


def _gland(haem: np.ndarray, eosin: np.ndarray, scale: float, rng: np.random.Generator) -> None:
    """A gland cross-section: white lumen ringed by radially elongated epithelial nuclei."""
    size = haem.shape[0]
    cy, cx = rng.uniform(0, size, 2)
    radius = rng.uniform(5, 10) * scale
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - cy, xx - cx)
    eosin *= 1 - 0.85 * special.expit((radius - dist) / (0.6 * scale))
    eosin += 0.2 * special.expit((2.5 * scale - np.abs(dist - radius - 3 * scale)) / (0.6 * scale))
    n = int(2 * np.pi * (radius + 3 * scale) / (4.5 * scale))
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    r = radius + 3 * scale + rng.normal(0, 0.4 * scale, n)
    centres = np.stack([cy + r * np.sin(theta), cx + r * np.cos(theta)], axis=1)
    _stamp(
        haem,
        centres,
        rng.uniform(1.6, 2.2, n) * scale,
        np.full(n, 0.35),
        0.05,
        rng.uniform(0.8, 1.0, n),
        rng,
        angles=theta,
    )


def _stamp(
    canvas: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    elongation: np.ndarray,
    irregularity: float,
    strength: np.ndarray,
    rng: np.random.Generator,
    angles: np.ndarray | None = None,
) -> None:
    """Paint soft-edged blobs whose outline wobbles with `irregularity`, all at once."""
    n = len(centres)
    if n == 0:
        return
    angles = rng.uniform(0, np.pi, n) if angles is None else angles
    # Outline r(theta) = radius * (1 + Re sum_k c_k e^{ik theta}), k = 2..4: the k=2 term
    # elongates along `angles`, random terms make the outline lumpy.
    coeffs = rng.normal(0, irregularity / 2, (n, 3)) * np.exp(2j * np.pi * rng.random((n, 3)))
    coeffs[:, 0] += elongation * np.exp(-2j * angles)
    reach = 1 + elongation.max() + 2 * irregularity
    half = int(np.ceil(radii.max() * reach)) + 2
    offsets = np.arange(-half, half + 1)
    iy = np.rint(centres[:, 0]).astype(int)[:, None, None] + offsets[None, :, None]
    ix = np.rint(centres[:, 1]).astype(int)[:, None, None] + offsets[None, None, :]
    offset = (ix - centres[:, 1, None, None]) + 1j * (iy - centres[:, 0, None, None])
    dist = np.abs(offset)
    z = offset / (dist + 1e-9)
    z2 = z * z
    c = coeffs[:, :, None, None]
    shape = 1 + (c[:, 0] * z2 + c[:, 1] * z2 * z + c[:, 2] * z2 * z2).real
    outline = radii[:, None, None] * shape.clip(0.3, reach)
    inside = special.expit((outline - dist) / 0.45)
    size = canvas.shape[0]
    keep = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size)
    iy, ix = np.broadcast_to(iy, keep.shape)[keep], np.broadcast_to(ix, keep.shape)[keep]
    np.maximum.at(canvas, (iy, ix), (strength[:, None, None] * inside)[keep])


def _smooth_noise(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to unit standard deviation."""
    spectrum = np.fft.rfft2(rng.standard_normal((size, size)))  # blurring in Fourier space
    field = np.fft.irfft2(ndimage.fourier_gaussian(spectrum, sigma, n=size), s=(size, size))
    return field / (field.std() + 1e-12)


def _blob_mask(size: int, sigma: float, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Soft mask covering about `fraction` of the tile in irregular blobs."""
    field = _smooth_noise(size, sigma, rng)
    threshold = np.quantile(field, 1 - fraction) if fraction > 0 else np.inf
    return special.expit(4 * (field - threshold))


def _to_rgb(haem: np.ndarray, eosin: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert mix of the two stains, with per-tile stain, brightness and sensor noise."""
    stains = []
    for vector in (_HAEMATOXYLIN, _EOSIN):
        v = (vector + rng.normal(0, 0.05, 3)).clip(0.02)
        stains.append(v / np.linalg.norm(v))
    density = (
        rng.uniform(0.7, 1.35) * haem[..., None] * stains[0]
        + rng.uniform(0.7, 1.35) * eosin[..., None] * stains[1]
    )
    light = rng.uniform(215, 255) * rng.uniform(0.95, 1.0, 3)
    rgb = light * np.exp(-ndimage.gaussian_filter(density, (0.5, 0.5, 0)))
    rgb += rng.normal(0, rng.uniform(2, 7), rgb.shape)
    return np.rint(rgb).clip(0, 255).astype(np.uint8)
