"""The embedded phantom: a synthetic, ultrasound-like organ segmentation dataset (no download).

Every case is a B-mode sector scan of one "organ": a smooth closed outline whose bright echogenic
wall (a few pixels thick, like a skull or a kidney capsule: structure a pretrained medical encoder
can see) is class 1 (``capsule``) and whose enclosed parenchyma is class 2 (``inner``). A few
consecutive cases ("frames") show the same subject with a small probe motion and organ
deformation; cases.csv records the subject, so grouped splits keep frames of one subject together.

How an image is made (deliberately simple physics, chosen so that the image statistics look and
behave like real ultrasound rather than like a clean cartoon):

* **Scene.** Everything is defined in continuous, normalised image coordinates (x, y in [0, 1],
  y pointing down, away from the probe), so the same subject looks the same at any ``size``.
  The scene gives, at any point, a mean backscatter ("echogenicity", linear intensity) and an
  attenuation coefficient: tissue with a low-frequency random texture, a few bright fascia-like
  layers near the probe, sometimes an anechoic vessel/cyst, a few strong reflectors
  (calcification- or bone-like) and the organ. The organ's outline is an ellipse whose radius is
  perturbed by a few random Fourier harmonics; its signed distance and outward normal are
  evaluated analytically.
* **Acquisition on scan lines.** The scene is sampled on a polar grid (depth x scan line) from
  the apex at the top centre, as a sector probe would. Random complex scatterer amplitudes,
  weighted by the square root of the echogenicity, are blurred by an anisotropic Gaussian point
  spread function; the squared envelope is fully developed speckle (exponential intensity,
  Rayleigh amplitude), spatially correlated like the real thing. The organ's parenchyma may have
  sparse scatterers (spikier, K-distributed texture) or a coherent component (smoother, Rician)
  instead, which is what makes an iso-echoic organ visible at all.
* **Attenuation.** The round-trip attenuation is integrated along each scan line, so strong
  reflectors cast acoustic shadows behind them (sometimes across the organ) and fluid-like
  organs/vessels show posterior enhancement. A random time-gain compensation curve (a
  partial linear compensation plus a few "slider" knots) undoes part of the depth decay.
  Electronic noise sets a floor that shows in shadows.
* **Display.** Log compression with a random dynamic range, gain and gamma, then scan
  conversion (bilinear) to the square Cartesian image; outside the fan the image is black.

The inner region's contrast against the surrounding tissue is drawn per subject from three
regimes (darker, brighter, nearly equal but with a different speckle texture), so a single
global intensity threshold cannot segment it (:func:`threshold_baseline` measures that), while
the outline's shape, the bright capsule and the texture still make the task learnable.

Each case is a pure function of ``(seed, case index, size, frames_per_subject)``: subject
parameters come from ``SeedSequence([seed, 0, subject])`` and per-frame randomness from
``SeedSequence([seed, 1, case])``, so a smaller ``n_cases`` gives a prefix of a larger dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import numpy as np
from scipy import ndimage

from ..io import DataError, DatasetInfo, DatasetWriter, load_case, load_dataset

DESCRIPTION = "Generate the embedded synthetic ultrasound phantom (organ capsule + inner region); no download."

NAME = "phantom"
CLASSES = ["background", "capsule", "inner"]
CAPSULE, INNER = 1, 2

# ----------------------------------------------------------------------------- named constants
# Lengths are normalised (1.0 = the image side), dB are intensity decibels (10*log10), and a
# pair (lo, hi) is a range a parameter is drawn from uniformly, per subject unless said otherwise.
FAN_HALF_ANGLE_DEG = (30.0, 40.0)  # half opening angle of the sector
APEX_ABOVE_TOP = (0.0, 0.08)  # the virtual apex sits this far above the top edge (curved probe face)
PROBE_FACE_GAP = (0.03, 0.06)  # first imaged depth below the top edge on the centre line
FAN_LATERAL_MARGIN = 0.01  # fan corners stay this far inside the left/right edges
FAN_BOTTOM_MARGIN = 0.02  # the fan's bottom arc stays this far above the bottom edge

ORGAN_DEPTH_RANGE = (0.4, 0.7)  # organ centre, as a fraction of the fan's depth range
ORGAN_ANGLE_FRACTION = 0.4  # organ centre within this fraction of the half angle
ORGAN_SIZE_OF_ROOM = (0.85, 1.0)  # organ size, as a fraction of the largest that fits in the fan
ORGAN_MIN_SEMI_AXIS = 0.15  # smaller draws are rejected (38 px at 256): the inner region stays sizeable
ORGAN_MAX_SEMI_AXIS = 0.30
ORGAN_ELONGATION = (0.65, 1.0)  # minor / major semi-axis
ORGAN_MIN_MINOR_AXIS = 0.12
ORGAN_HARMONICS = np.arange(2, 6)  # Fourier harmonics of the radius (k = 1 would only translate)
HARMONIC_AMPLITUDE = 0.18  # amplitude of harmonic k is uniform in +-HARMONIC_AMPLITUDE / k
CAPSULE_THICKNESS = (0.035, 0.050)  # 9 .. 13 px at 256 (4.5 .. 6.4 px at the demo student's 128)

FRAME_SHIFT_SD = 0.012  # probe motion between frames
FRAME_ROTATION_SD = 0.05  # rad, organ rotation between frames
FRAME_SCALE_SD = 0.03  # organ size change between frames (breathing, pressure)
FRAME_HARMONIC_SD = 0.012  # shape change between frames (of the lowest harmonic; k-th: * 2 / k)

# Inner-region contrast regimes: (probability, contrast range in dB relative to tissue)
CONTRAST_REGIMES = {
    "darker": (0.4, (-14.0, -5.0)),
    "brighter": (0.3, (4.0, 10.0)),
    "iso": (0.3, (-1.5, 1.5)),
}
INNER_TEXTURE_SD = (0.0, 0.5)  # low-frequency heterogeneity of the parenchyma (natural-log units)
SPARSE_SCATTERER_FRACTION = (0.15, 0.4)  # "rough" texture: few scatterers per resolution cell
COHERENT_FRACTION = (0.55, 0.85)  # "smooth" texture: share of a coherent (specular) component
CAPSULE_GAIN_DB = (10.0, 16.0)  # capsule echo at normal incidence: a bright, skull- or kidney-capsule-like wall
CAPSULE_GRAZING_FLOOR = (0.55, 0.85)  # fraction of that gain left at grazing incidence (the wall stays visible)
CAPSULE_SPECULAR_POWER = (1.0, 3.0)

TISSUE_TEXTURE_SD = ((0.2, 0.5), (0.1, 0.35))  # coarse and medium texture octaves (natural-log units)
TEXTURE_GRID = (6, 16, 10)  # coarse, medium tissue and inner texture: random knots per side
TEXTURE_PAD = 0.1  # texture grids extend this far beyond the image (frame shifts)
TEXTURE_RES = 64  # texture fields are stored on this grid and interpolated bilinearly

LAYER_COUNT = (0, 3)  # fascia-like bright arcs between the probe and the organ
LAYER_GAIN_DB = (3.0, 9.0)
LAYER_THICKNESS = (0.003, 0.009)
LAYER_WAVINESS = 0.012

VESSEL_PROBABILITY = 0.4
VESSEL_RADIUS = (0.025, 0.06)
VESSEL_ECHO_DB = (-25.0, -15.0)
VESSEL_ATTENUATION_FRACTION = 0.15  # fluid attenuates much less than tissue -> enhancement behind

REFLECTOR_COUNT_P = (0.25, 0.35, 0.25, 0.15)  # probability of 0, 1, 2, 3 reflectors
REFLECTOR_IN_FRONT_P = 0.35  # one reflector placed so that its shadow crosses the organ
REFLECTOR_LATERAL = (0.008, 0.05)  # half-size across the beam
REFLECTOR_AXIAL = (0.003, 0.007)  # half-size along the beam
REFLECTOR_ECHO_DB = (10.0, 20.0)
REFLECTOR_SHADOW_DB = (8.0, 25.0)  # total extra attenuation through a reflector
SHADOW_MAX_ORGAN_FRACTION = 0.35  # shadow's angular half-width <= this fraction of the organ's
SHADOW_MAX_FAN_FRACTION = 0.2  # ... and of the fan's half angle

ATTENUATION_DB_PER_UNIT = (30.0, 60.0)  # round trip, per unit depth
TGC_COMPENSATION = (0.55, 1.0)  # fraction of the mean attenuation the TGC undoes
TGC_SLIDERS = 5  # slider knots, evenly spaced in depth, each offset uniformly in +-TGC_SLIDER_DB
TGC_SLIDER_DB = 3.0
INNER_ATTENUATION_DARK = (0.1, 0.4)  # fluid-like dark organs (posterior enhancement)
INNER_ATTENUATION_SOLID = (0.9, 1.5)  # the others (relative to tissue)

PSF_SIGMA = (0.9, 0.9)  # speckle correlation in samples: (axial, lateral)
LINES_PER_PIXEL = 0.75  # scan lines per image column
MIN_LINES = 16  # at tiny sizes
NOISE_ABOVE_FLOOR_DB = (2.0, 8.0)  # electronic noise level above the display floor
DYNAMIC_RANGE_DB = (40.0, 60.0)
TISSUE_GRAY_FRACTION = (0.45, 0.7)  # where 0 dB (mean tissue) lands in the display range
FRAME_GAIN_JITTER_DB = 1.0  # per frame, uniform in +-
DISPLAY_GAMMA = (0.8, 1.3)

DB_PER_NEPER = 10.0 / np.log(10.0)  # natural-log intensity units -> dB
EDGE_WIDTH = 0.003  # soft edge of the small ellipses (vessel, reflectors)
FAR = 0.05  # organ distance is evaluated up to this far outside the outline


# ------------------------------------------------------------------------------ the parameters
@dataclass(frozen=True)
class Fan:
    apex_x: float
    apex_y: float  # <= 0: at or above the top edge
    r_min: float
    r_max: float
    half_angle: float  # rad


@dataclass(frozen=True)
class Organ:
    cx: float
    cy: float
    a: float  # semi-axes before the harmonic perturbation
    b: float
    angle: float  # rad
    amps: np.ndarray  # amplitude of each of ORGAN_HARMONICS
    phases: np.ndarray
    capsule: float  # rim thickness


@dataclass(frozen=True)
class Ellipse:
    """A small ellipse aligned with the beam at its centre (reflector) or free (vessel)."""

    cx: float
    cy: float
    a: float  # half-size across the beam
    b: float  # half-size along the beam
    echo_db: float
    attenuation: float  # dB per unit depth inside


@dataclass(frozen=True)
class Subject:
    fan: Fan
    organ: Organ
    regime: str
    inner_db: float
    inner_texture: str  # "rayleigh" | "sparse" | "coherent"
    inner_texture_param: float
    inner_attenuation: float
    capsule_db: float
    capsule_floor: float
    capsule_power: float
    textures: tuple  # log-echogenicity texture fields of the tissue and of the parenchyma
    layers: tuple  # (depth, thickness, gain_db, wave_freq, wave_phase) per layer
    vessel: Optional[Ellipse]
    reflectors: tuple  # of Ellipse
    attenuation: float  # tissue, dB per unit depth (round trip)
    tgc_compensation: float
    tgc_knots: np.ndarray  # slider offsets in dB at evenly spaced depths
    dynamic_range: float
    tissue_gray: float
    noise_db: float
    gamma: float


def _uniform(rng: np.random.Generator, bounds) -> float:
    return float(rng.uniform(*bounds))


def _sample_fan(rng: np.random.Generator) -> Fan:
    half = np.deg2rad(_uniform(rng, FAN_HALF_ANGLE_DEG))
    apex_y = -_uniform(rng, APEX_ABOVE_TOP)
    r_min = -apex_y + _uniform(rng, PROBE_FACE_GAP)
    r_max = min(1.0 - FAN_BOTTOM_MARGIN - apex_y, (0.5 - FAN_LATERAL_MARGIN) / np.sin(half))
    return Fan(0.5, apex_y, r_min, r_max, half)


def _fan_point(fan: Fan, r: float, theta: float) -> tuple:
    return fan.apex_x + r * np.sin(theta), fan.apex_y + r * np.cos(theta)


def _outline(organ: Organ, n_points: int = 96) -> tuple:
    """Points (x, y) on the organ's outline."""
    t = np.linspace(0.0, 2 * np.pi, n_points, endpoint=False)
    radius = organ.a * organ.b / np.hypot(organ.b * np.cos(t), organ.a * np.sin(t))
    radius = radius * (1.0 + (organ.amps[:, None] * np.cos(ORGAN_HARMONICS[:, None] * t + organ.phases[:, None])).sum(0))
    c, s = np.cos(organ.angle), np.sin(organ.angle)
    xr, yr = radius * np.cos(t), radius * np.sin(t)
    return organ.cx + c * xr - s * yr, organ.cy + s * xr + c * yr


def _inside_fan(fan: Fan, x: np.ndarray, y: np.ndarray, margin: float) -> bool:
    r = np.hypot(x - fan.apex_x, y - fan.apex_y)
    theta = np.arctan2(x - fan.apex_x, y - fan.apex_y)
    lateral = r * np.sin(fan.half_angle - np.abs(theta))  # distance to the fan's straight edges
    return bool(np.all((r >= fan.r_min + margin) & (r <= fan.r_max - margin) & (lateral >= margin)))


def _largest_fitting_scale(organ: Organ, fan: Fan, margin: float) -> float:
    """Largest factor by which the organ's semi-axes can grow with its outline inside the fan."""
    lo, hi = 0.0, 1.0
    while _inside_fan(fan, *_outline(replace(organ, a=organ.a * hi, b=organ.b * hi)), margin) and hi < 64:
        lo, hi = hi, 2 * hi
    for _ in range(20):  # bisection
        mid = 0.5 * (lo + hi)
        if _inside_fan(fan, *_outline(replace(organ, a=organ.a * mid, b=organ.b * mid)), margin):
            lo = mid
        else:
            hi = mid
    return lo


def _sample_organ(rng: np.random.Generator, fan: Fan) -> Organ:
    """A random outline placed in the fan, as large as a random fraction of the room allows."""
    margin = 2 * CAPSULE_THICKNESS[1]  # room for frame motion
    depth = fan.r_max - fan.r_min
    for _ in range(50):  # rejection: a centre and shape with enough room around them
        amps = rng.uniform(-1.0, 1.0, ORGAN_HARMONICS.size) * HARMONIC_AMPLITUDE / ORGAN_HARMONICS
        phases = rng.uniform(0.0, 2 * np.pi, ORGAN_HARMONICS.size)
        r_c = fan.r_min + depth * _uniform(rng, ORGAN_DEPTH_RANGE)
        th_c = fan.half_angle * ORGAN_ANGLE_FRACTION * rng.uniform(-1.0, 1.0)
        cx, cy = _fan_point(fan, r_c, th_c)
        unit = Organ(cx, cy, 1.0, _uniform(rng, ORGAN_ELONGATION), rng.uniform(0, np.pi), amps, phases,
                     _uniform(rng, CAPSULE_THICKNESS))
        scale = min(_largest_fitting_scale(unit, fan, margin) * _uniform(rng, ORGAN_SIZE_OF_ROOM),
                    ORGAN_MAX_SEMI_AXIS)
        organ = replace(unit, a=scale, b=unit.b * scale)
        if organ.a >= ORGAN_MIN_SEMI_AXIS and organ.b >= ORGAN_MIN_MINOR_AXIS:
            return organ
    raise RuntimeError("could not place an organ in the fan; the ORGAN_* ranges are inconsistent")


def _organ_extent(organ: Organ) -> float:
    return organ.a * (1.0 + np.abs(organ.amps).sum())


def _sample_layers(rng: np.random.Generator, fan: Fan, organ: Organ) -> tuple:
    organ_top = np.hypot(organ.cx - fan.apex_x, organ.cy - fan.apex_y) - _organ_extent(organ)
    lo, hi = fan.r_min + 0.02, min(fan.r_min + 0.2, organ_top - 0.03)
    n = int(rng.integers(LAYER_COUNT[0], LAYER_COUNT[1] + 1)) if hi > lo else 0
    return tuple((_uniform(rng, (lo, hi)), _uniform(rng, LAYER_THICKNESS), _uniform(rng, LAYER_GAIN_DB),
                  _uniform(rng, (1.0, 4.0)), _uniform(rng, (0, 2 * np.pi))) for _ in range(n))


def _sample_vessel(rng: np.random.Generator, fan: Fan, organ: Organ, attenuation: float) -> Optional[Ellipse]:
    if rng.random() >= VESSEL_PROBABILITY:
        return None
    for _ in range(20):
        radius = _uniform(rng, VESSEL_RADIUS)
        r = _uniform(rng, (fan.r_min + radius + 0.03, fan.r_max - radius - 0.03))
        th = rng.uniform(-1, 1) * (fan.half_angle - (radius + 0.02) / r)
        x, y = _fan_point(fan, r, th)
        if np.hypot(x - organ.cx, y - organ.cy) > _organ_extent(organ) + radius + 0.03:
            return Ellipse(x, y, radius, radius * _uniform(rng, (0.6, 1.0)), _uniform(rng, VESSEL_ECHO_DB),
                           attenuation * VESSEL_ATTENUATION_FRACTION)
    return None


def _sample_reflectors(rng: np.random.Generator, fan: Fan, organ: Organ) -> tuple:
    """Strong reflectors: beam-aligned bright ellipses that attenuate strongly (acoustic shadows)."""
    r_org = np.hypot(organ.cx - fan.apex_x, organ.cy - fan.apex_y)
    th_org = np.arctan2(organ.cx - fan.apex_x, organ.cy - fan.apex_y)
    extent = _organ_extent(organ)
    organ_half_angle = np.arcsin(min(1.0, extent / r_org))
    # a shadow may hide part of the organ but never all of it
    max_shadow_angle = min(SHADOW_MAX_ORGAN_FRACTION * organ_half_angle, SHADOW_MAX_FAN_FRACTION * fan.half_angle)

    def make(r, th):
        x, y = _fan_point(fan, r, th)
        axial = _uniform(rng, REFLECTOR_AXIAL)
        lateral = min(_uniform(rng, REFLECTOR_LATERAL), r * max_shadow_angle)
        return Ellipse(x, y, max(lateral, axial), axial, _uniform(rng, REFLECTOR_ECHO_DB),
                       _uniform(rng, REFLECTOR_SHADOW_DB) / (2 * axial))

    n = int(rng.choice(len(REFLECTOR_COUNT_P), p=REFLECTOR_COUNT_P))
    reflectors = []
    if n and rng.random() < REFLECTOR_IN_FRONT_P and r_org - extent - 0.03 > fan.r_min + 0.03:
        # in front of the organ, within its angular span: the shadow falls across it
        r = _uniform(rng, (fan.r_min + 0.03, r_org - extent - 0.03))
        reflectors.append(make(r, th_org + rng.uniform(-0.8, 0.8) * organ_half_angle))
        n -= 1
    for _ in range(n):
        r = _uniform(rng, (fan.r_min + 0.03, fan.r_max - 0.05))
        reflectors.append(make(r, rng.uniform(-0.9, 0.9) * fan.half_angle))
    return tuple(reflectors)


def sample_subject(seed: int, subject: int) -> Subject:
    """All of one subject's parameters (size-independent), from ``SeedSequence([seed, 0, subject])``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, subject]))
    fan = _sample_fan(rng)
    organ = _sample_organ(rng, fan)
    names = list(CONTRAST_REGIMES)
    regime = names[int(rng.choice(len(names), p=[CONTRAST_REGIMES[k][0] for k in names]))]
    inner_db = _uniform(rng, CONTRAST_REGIMES[regime][1])
    # texture: iso-echoic organs always differ in texture; the others sometimes do
    texture = rng.choice(["sparse", "coherent"]) if regime == "iso" else rng.choice(
        ["rayleigh", "rayleigh", "sparse", "coherent"])
    texture_param = _uniform(rng, SPARSE_SCATTERER_FRACTION if texture == "sparse" else COHERENT_FRACTION)
    attenuation = _uniform(rng, ATTENUATION_DB_PER_UNIT)
    inner_att = attenuation * _uniform(rng, INNER_ATTENUATION_DARK if regime == "darker" else INNER_ATTENUATION_SOLID)
    coarse, medium, inner_knots = (rng.standard_normal((g, g)) for g in TEXTURE_GRID)
    tissue_sd = tuple(_uniform(rng, sd) for sd in TISSUE_TEXTURE_SD)
    textures = (_texture_field((coarse, medium), tissue_sd),
                _texture_field((inner_knots,), (_uniform(rng, INNER_TEXTURE_SD),)))
    dynamic_range = _uniform(rng, DYNAMIC_RANGE_DB)
    return Subject(
        fan=fan, organ=organ, regime=regime, inner_db=inner_db,
        inner_texture=str(texture),
        inner_texture_param=texture_param, inner_attenuation=inner_att,
        capsule_db=_uniform(rng, CAPSULE_GAIN_DB), capsule_floor=_uniform(rng, CAPSULE_GRAZING_FLOOR),
        capsule_power=_uniform(rng, CAPSULE_SPECULAR_POWER),
        textures=textures,
        layers=_sample_layers(rng, fan, organ), vessel=_sample_vessel(rng, fan, organ, attenuation),
        reflectors=_sample_reflectors(rng, fan, organ), attenuation=attenuation,
        tgc_compensation=_uniform(rng, TGC_COMPENSATION),
        tgc_knots=rng.uniform(-TGC_SLIDER_DB, TGC_SLIDER_DB, TGC_SLIDERS),
        dynamic_range=dynamic_range, tissue_gray=_uniform(rng, TISSUE_GRAY_FRACTION),
        noise_db=_uniform(rng, NOISE_ABOVE_FLOOR_DB), gamma=_uniform(rng, DISPLAY_GAMMA),
    )


@dataclass(frozen=True)
class Frame:
    shift: tuple  # probe motion (dx, dy), applied to the whole scene
    organ: Organ  # the subject's organ after this frame's deformation
    gain_db: float


def sample_frame(subject: Subject, rng: np.random.Generator) -> Frame:
    """One frame's motion and deformation of ``subject``."""
    o = subject.organ
    harmonic_falloff = ORGAN_HARMONICS[0] / ORGAN_HARMONICS  # higher harmonics change less
    scale = 1.0 + FRAME_SCALE_SD * rng.standard_normal()
    organ = replace(o, a=o.a * scale, b=o.b * scale, angle=o.angle + FRAME_ROTATION_SD * rng.standard_normal(),
                    amps=o.amps + FRAME_HARMONIC_SD * rng.standard_normal(o.amps.size) * harmonic_falloff)
    shift = tuple(FRAME_SHIFT_SD * rng.standard_normal(2))
    return Frame(shift, organ, FRAME_GAIN_JITTER_DB * float(rng.uniform(-1, 1)))


# ------------------------------------------------------------------------ the scene at points
def organ_distance(organ: Organ, x: np.ndarray, y: np.ndarray, with_normal: bool = False):
    """Signed distance to the organ outline (positive inside), and optionally the outward normal.

    The outline is ``R(t) = R_ellipse(t) * (1 + sum_k A_k cos(k t + phi_k))`` in the organ's
    frame; with ``g = R'/R`` the first-order distance is ``(R - rho) / sqrt(1 + g^2)`` and the
    outward normal is along ``e_rho - g e_t`` (both exact on the outline, accurate near it).
    Only points near the organ are evaluated; the others get ``-FAR`` (and a zero normal).
    """
    dist = np.full(x.shape, -FAR)
    normal = (np.zeros(x.shape), np.zeros(x.shape))
    reach = _organ_extent(organ) + FAR
    near = (np.abs(x - organ.cx) < reach) & (np.abs(y - organ.cy) < reach)
    c, s = np.cos(organ.angle), np.sin(organ.angle)
    dx, dy = x[near] - organ.cx, y[near] - organ.cy
    xr, yr = c * dx + s * dy, -s * dx + c * dy
    rho = np.maximum(np.hypot(xr, yr), 1e-9)  # the centre itself: any direction will do
    cos_t, sin_t = xr / rho, yr / rho
    q = (organ.b * cos_t) ** 2 + (organ.a * sin_t) ** 2
    radius = organ.a * organ.b / np.sqrt(q)
    g = -(organ.a ** 2 - organ.b ** 2) * sin_t * cos_t / q  # d log R_ellipse / dt
    # harmonics via powers of exp(i t): cheaper than cos/sin of k t
    unit, power = cos_t + 1j * sin_t, np.ones_like(rho, dtype=complex)
    wave, dwave = np.ones_like(rho), np.zeros_like(rho)
    for k in range(1, ORGAN_HARMONICS[-1] + 1):
        power = power * unit
        if k in ORGAN_HARMONICS:
            i = int(np.flatnonzero(ORGAN_HARMONICS == k)[0])
            term = power * np.exp(1j * organ.phases[i])
            wave += organ.amps[i] * term.real
            dwave -= k * organ.amps[i] * term.imag
    radius = radius * wave
    g = g + dwave / wave
    norm = np.sqrt(1.0 + g * g)
    dist[near] = (radius - rho) / norm
    if not with_normal:
        return dist
    nxo, nyo = (cos_t + g * sin_t) / norm, (sin_t - g * cos_t) / norm
    normal[0][near], normal[1][near] = c * nxo - s * nyo, s * nxo + c * nyo
    return dist, normal[0], normal[1]


def _ellipse_inside(e: Ellipse, fan: Fan, x: np.ndarray, y: np.ndarray, beam_aligned: bool) -> tuple:
    """Soft indicator (1 inside, 0 outside, EDGE_WIDTH transition) of a small ellipse.

    Returns ``(near, weight)``: a boolean mask of the points close to the ellipse and the
    indicator at those points (it is 0 everywhere else).
    """
    reach = max(e.a, e.b) + EDGE_WIDTH
    near = (np.abs(x - e.cx) < reach) & (np.abs(y - e.cy) < reach)
    dx, dy = x[near] - e.cx, y[near] - e.cy
    if beam_aligned:  # axes across / along the beam through the centre
        th = np.arctan2(e.cx - fan.apex_x, e.cy - fan.apex_y)
        c, s = np.cos(th), np.sin(th)
        dx, dy = c * dx - s * dy, s * dx + c * dy
    q = np.sqrt((dx / e.a) ** 2 + (dy / e.b) ** 2)
    return near, np.clip((1.0 - q) * e.b / EDGE_WIDTH + 0.5, 0.0, 1.0)


def _texture_field(knots: tuple, weights: tuple) -> np.ndarray:
    """A smooth random field on a TEXTURE_RES grid: weighted cubic-spline interpolations of knot grids.

    Both the knots and the field span the image padded by TEXTURE_PAD on every side.
    """
    field = np.zeros((TEXTURE_RES, TEXTURE_RES))
    for grid, weight in zip(knots, weights):
        at = np.linspace(0, grid.shape[0] - 1, TEXTURE_RES)
        field += weight * ndimage.map_coordinates(grid, np.meshgrid(at, at, indexing="ij"), order=3,
                                                  mode="nearest")
    return field


def _texture(field: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The field at points (bilinear; it is smooth on the scale of its grid)."""
    to_index = lambda v: (v + TEXTURE_PAD) / (1 + 2 * TEXTURE_PAD) * (TEXTURE_RES - 1)  # noqa: E731
    return ndimage.map_coordinates(field, [to_index(y), to_index(x)], order=1, mode="nearest")


def scene(subject: Subject, frame: Frame, r: np.ndarray, theta: np.ndarray) -> tuple:
    """Echogenicity (dB), attenuation (dB per unit depth) and parenchyma weight on a polar grid.

    ``r`` (depths, 1-D) and ``theta`` (line angles, 1-D) are probe coordinates; the results are
    (len(r), len(theta)) arrays. The scene is shifted by the frame's probe motion.
    """
    fan = subject.fan
    x = fan.apex_x - frame.shift[0] + r[:, None] * np.sin(theta)[None, :]
    y = fan.apex_y - frame.shift[1] + r[:, None] * np.cos(theta)[None, :]
    tissue_field, inner_field = subject.textures
    echo_db = DB_PER_NEPER * _texture(tissue_field, x, y)
    for depth, thickness, gain, freq, phase in subject.layers:  # fascia-like arcs under the probe
        rows = np.abs(r - depth) < LAYER_WAVINESS + 4 * thickness  # the layer is negligible elsewhere
        wavy = depth + LAYER_WAVINESS * np.sin(freq * theta / fan.half_angle + phase)
        echo_db[rows] += gain * np.exp(-(((r[rows, None] - wavy[None, :]) / thickness) ** 2))
    attenuation = np.full(x.shape, subject.attenuation)

    dist, nx, ny = organ_distance(frame.organ, x, y, with_normal=True)
    sample = (fan.r_max - fan.r_min) / (r.size - 1)  # soft edges, one depth sample wide
    inner = np.clip((dist - frame.organ.capsule) / sample + 0.5, 0.0, 1.0)
    organ = np.clip(dist / sample + 0.5, 0.0, 1.0)
    at = organ > 0  # only points in or at the organ change
    capsule, inner_at = organ[at] - inner[at], inner[at]
    # specular capsule: brightest where the beam hits the outline at normal incidence
    beam_x, beam_y = np.broadcast_to(np.sin(theta), x.shape)[at], np.broadcast_to(np.cos(theta), x.shape)[at]
    incidence = np.abs(nx[at] * beam_x + ny[at] * beam_y)
    specular = subject.capsule_floor + (1 - subject.capsule_floor) * incidence ** subject.capsule_power
    echo_db[at] += capsule * subject.capsule_db * specular + inner_at * (
        subject.inner_db + DB_PER_NEPER * _texture(inner_field, x[at], y[at]))
    attenuation[at] += inner_at * (subject.inner_attenuation - subject.attenuation)

    vessels = [] if subject.vessel is None else [(subject.vessel, False)]
    for e, beam_aligned in vessels + [(e, True) for e in subject.reflectors]:
        near, weight = _ellipse_inside(e, fan, x, y, beam_aligned)
        echo_db[near] += weight * e.echo_db
        attenuation[near] += weight * (e.attenuation - subject.attenuation)
    return echo_db, attenuation, inner


# ---------------------------------------------------------------------------- image formation
def _psf_energy(sigma: tuple) -> float:
    """Mean of |PSF * complex unit noise|^2, to normalise speckle intensity to mean 1."""
    delta = np.zeros((33, 33))
    delta[16, 16] = 1.0
    return 2.0 * float((ndimage.gaussian_filter(delta, sigma) ** 2).sum())


_PSF_ENERGY = _psf_energy(PSF_SIGMA)


def _scan_lines(subject: Subject, frame: Frame, rng: np.random.Generator, size: int) -> np.ndarray:
    """The log-compressed display values in [0, 1] on the polar (depth x line) grid."""
    fan = subject.fan
    n_depth, n_lines = size, max(MIN_LINES, int(round(LINES_PER_PIXEL * size)))
    r = np.linspace(fan.r_min, fan.r_max, n_depth)
    theta = np.linspace(-fan.half_angle, fan.half_angle, n_lines)
    echo_db, attenuation, inner = scene(subject, frame, r, theta)
    shape = echo_db.shape

    # scatterers -> PSF -> envelope: fully developed speckle with mean intensity 10^(echo_db/10)
    amplitude = 10.0 ** (echo_db / 20.0)
    if subject.inner_texture == "sparse":  # few strong scatterers: same mean, spikier texture
        p = subject.inner_texture_param
        keep = (rng.random(shape) < p) / np.sqrt(p)
        amplitude_scatter = amplitude * (1 - inner + inner * keep)
    else:
        amplitude_scatter = amplitude
    scatter = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    field = ndimage.gaussian_filter(scatter * amplitude_scatter, PSF_SIGMA) / np.sqrt(_PSF_ENERGY)
    if subject.inner_texture == "coherent":  # add a coherent part: same mean, smoother texture
        rho = subject.inner_texture_param * inner
        field = field * np.sqrt(1 - rho) + np.sqrt(rho) * amplitude
    intensity = field.real ** 2 + field.imag ** 2

    # round-trip attenuation integrated along each line, partly undone by the TGC
    depth = r - fan.r_min
    loss = np.cumsum(attenuation, axis=0) * (depth[1] - depth[0])
    sliders = np.interp(depth, np.linspace(0, depth[-1], TGC_SLIDERS), subject.tgc_knots)
    tgc = subject.tgc_compensation * subject.attenuation * depth + sliders
    signal = intensity * 10.0 ** ((tgc[:, None] - loss) / 10.0)

    # electronic noise, log compression, gain and gamma
    floor_db = -subject.tissue_gray * subject.dynamic_range - frame.gain_db
    noise = 10.0 ** ((floor_db + subject.noise_db) / 10.0) * rng.standard_exponential(shape)
    display = (10.0 * np.log10(signal + noise) - floor_db) / subject.dynamic_range
    return np.clip(display, 0.0, 1.0) ** subject.gamma


def _pixel_grid(size: int) -> tuple:
    centres = (np.arange(size) + 0.5) / size
    return np.meshgrid(centres, centres)  # x, y


def render_case(subject: Subject, frame: Frame, rng: np.random.Generator, size: int) -> tuple:
    """(image, mask), both (size, size) uint8."""
    fan = subject.fan
    lines = _scan_lines(subject, frame, rng, size)
    x, y = _pixel_grid(size)
    r = np.hypot(x - fan.apex_x, y - fan.apex_y)
    theta = np.arctan2(x - fan.apex_x, y - fan.apex_y)
    in_fan = (r >= fan.r_min) & (r <= fan.r_max) & (np.abs(theta) <= fan.half_angle)

    # scan conversion: bilinear interpolation between samples and lines
    n_depth, n_lines = lines.shape
    rows = (r[in_fan] - fan.r_min) / (fan.r_max - fan.r_min) * (n_depth - 1)
    cols = (theta[in_fan] + fan.half_angle) / (2 * fan.half_angle) * (n_lines - 1)
    image = np.zeros((size, size), np.uint8)
    image[in_fan] = np.round(255.0 * ndimage.map_coordinates(lines, [rows, cols], order=1, mode="nearest"))

    dist = organ_distance(frame.organ, x - frame.shift[0], y - frame.shift[1])
    mask = np.where(dist > frame.organ.capsule, INNER, np.where(dist > 0, CAPSULE, 0)).astype(np.uint8)
    mask[~in_fan] = 0
    return image, mask


MIN_SIZE = 16


def _check_options(n_cases: int = 1, seed: int = 0, size: int = MIN_SIZE, frames_per_subject: int = 1) -> None:
    for name, value, least in (("n_cases", n_cases, 1), ("seed", seed, 0), ("size", size, MIN_SIZE),
                               ("frames_per_subject", frames_per_subject, 1)):
        if int(value) != value or value < least:
            raise DataError(f"phantom option {name} must be an integer >= {least}, got {value!r}")


def case_names(index: int, frames_per_subject: int) -> tuple:
    return f"ph{index:04d}", f"s{index // frames_per_subject:03d}"


def generate_case(seed: int, index: int, size: int = 256, frames_per_subject: int = 4) -> tuple:
    """``(image, mask, subject_id)`` of case ``index``; a pure function of its arguments."""
    _check_options(seed=seed, size=size, frames_per_subject=frames_per_subject)
    subject_index = index // frames_per_subject
    subject = sample_subject(seed, subject_index)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1, index]))
    frame = sample_frame(subject, rng)
    image, mask = render_case(subject, frame, rng, size)
    return image, mask, case_names(index, frames_per_subject)[1]


# -------------------------------------------------------------------------- converter contract
def add_arguments(parser) -> None:
    parser.add_argument("--n-cases", type=int, default=300, help="number of cases (frames)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a deterministic function of it")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (square)")
    parser.add_argument("--frames-per-subject", type=int, default=4,
                        help="consecutive cases showing the same subject")


def prepare(raw, out: os.PathLike, overwrite: bool = False, n_cases: int = 300, seed: int = 0, size: int = 256,
            frames_per_subject: int = 4) -> Path:
    """Write ``out/phantom`` (``raw`` is ignored: nothing is downloaded) and return that folder."""
    _check_options(n_cases=n_cases, seed=seed, size=size, frames_per_subject=frames_per_subject)
    meta = {
        "name": NAME,
        "modality": "ultrasound (synthetic phantom)",
        "classes": CLASSES,
        "license": "CC0-1.0",
        "citation": "tskd synthetic ultrasound phantom (generated by tskd_utils.datasets.phantom); "
                    "no publication, cite the tskd repository",
        "source": f"synthetic: tskd_utils.datasets.phantom (seed={seed}, n_cases={n_cases}, size={size})",
        "frames_per_subject": frames_per_subject,
    }
    target = Path(out) / NAME
    with DatasetWriter(target, meta, overwrite=overwrite) as writer:
        for index in range(n_cases):
            image, mask, subject = generate_case(seed, index, size, frames_per_subject)
            writer.add_case(case_names(index, frames_per_subject)[0], subject, image, mask)
    return target


# ------------------------------------------------------------------------- threshold baseline
def threshold_baseline(info_or_root: Union[DatasetInfo, os.PathLike, str]) -> dict:
    """How well intensity thresholds segment the foreground (``mask > 0``): a difficulty check.

    Dice is per case, then averaged over cases. ``best_global_*``: the one threshold ``t`` in
    0..255 and direction (``image > t`` or ``image < t``) that is best over the whole dataset;
    ``oracle_dice``: the best threshold and direction chosen per image (an upper bound no real
    method gets). ``*_window_*``: the same for an intensity window ``lo <= image <= hi``, which
    also covers dark organs without the black outside of the fan.
    """
    info = info_or_root if isinstance(info_or_root, DatasetInfo) else load_dataset(info_or_root)
    levels = 256
    thresholds = np.arange(levels)
    window_sum = np.zeros((levels + 1, levels + 1))
    greater, less, oracle_window = [], [], []
    for record in info.cases:
        image, mask = load_case(info, record)
        fg = mask > 0
        # cum[i] = number of pixels with value < i, for i = 0..256
        all_cum = np.concatenate([[0], np.cumsum(np.bincount(image.ravel(), minlength=levels))])
        fg_cum = np.concatenate([[0], np.cumsum(np.bincount(image[fg], minlength=levels))])
        # window lo <= value < hi  <->  dice[lo, hi]; lo = 0 is "image < hi", hi = 256 is "image >= lo"
        tp = fg_cum[None, :] - fg_cum[:, None]
        pred = all_cum[None, :] - all_cum[:, None]
        denominator = pred + fg_cum[-1]
        dice = np.triu(np.divide(2.0 * tp, denominator, out=np.ones_like(denominator, float),
                                 where=denominator > 0), k=1)
        window_sum += dice
        oracle_window.append(dice.max())
        greater.append(dice[thresholds + 1, levels])  # image > t
        less.append(dice[0, thresholds])  # image < t
    greater, less = np.array(greater), np.array(less)
    mean_greater, mean_less = greater.mean(0), less.mean(0)
    if mean_greater.max() >= mean_less.max():
        best, direction, t = mean_greater.max(), ">", int(mean_greater.argmax())
    else:
        best, direction, t = mean_less.max(), "<", int(mean_less.argmax())
    window_mean = window_sum / len(info.cases)
    lo, hi = np.unravel_index(int(window_mean.argmax()), window_mean.shape)
    return {
        "n_cases": len(info.cases),
        "best_global_dice": float(best),
        "best_global_threshold": t,
        "best_global_direction": direction,
        "oracle_dice": float(np.maximum(greater.max(1), less.max(1)).mean()),
        "best_global_window_dice": float(window_mean.max()),
        "best_global_window": (int(lo), int(hi) - 1),  # lo <= image <= hi
        "oracle_window_dice": float(np.mean(oracle_window)),
    }
