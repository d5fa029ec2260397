"""Parity of mbv3_jax.transforms (numpy) with torchvision's eval presets and torch's resize kernel.

The presets round an antialiased float32 resize to uint8, so the numpy resize must equal torch's bitwise:
the ``needs_kernel`` tests compare exactly (0 differing values) against the ATen build we replay. Where
torch's own build is one of :data:`mbv3_jax.transforms.KERNELS` (capability AVX2 or DEFAULT) torch runs
in-process; above it (AVX512) torch runs once, for all cases, in a subprocess capped with
``ATEN_CPU_CAPABILITY=avx2`` (the ``torch_ref`` fixture), so every x86 machine has exact evidence; the
DEFAULT replay is checked likewise (``ATEN_CPU_CAPABILITY=default``). Against torch's own kernel on this
machine, whatever it is, the presets on the photos are held to a stated bound instead (``FLIP_BOUND``):
another accumulation order moves float32 values by a few ulps, so a value that close to x.5 rounds the
other way, by 1 level of 255 and never more.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import platform
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from extras import HAVE_TORCH, needs_torch, run_capped

from mbv3_jax import transforms as T

if HAVE_TORCH:  # the optional "torch" extra: without it the needs_torch tests skip, the others run
    import skimage.data as skdata
    import torch
    import torch.nn.functional as Fnn
    import torchvision.transforms.functional as TF
    from torchvision.models import get_model_weights
    from torchvision.transforms._presets import ImageClassification, SemanticSegmentation

    from porting.calibration import PHOTO_NAMES

REPO = Path(__file__).resolve().parents[1]
PHOTOS = list(PHOTO_NAMES) if HAVE_TORCH else []
CAPABILITY = torch.backends.cpu.get_cpu_capability() if HAVE_TORCH else None
X86 = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686", "x86"}
# torch runs here where its build is one we replay; on x86 above AVX2 it runs capped to AVX2 in a subprocess
IN_PROCESS = CAPABILITY in ("AVX2", "DEFAULT")
KERNEL = {"AVX2": "avx2", "DEFAULT": "default"}.get(CAPABILITY, "avx2" if X86 else None)
# Skips only off x86 (e.g. ARM's SVE builds), where ATEN_CPU_CAPABILITY=avx2 does not exist.
needs_kernel = pytest.mark.skipif(
    HAVE_TORCH and KERNEL is None,
    reason=f"torch CPU capability {CAPABILITY} on {platform.machine()} is not one of the replayed kernels "
    f"{T.KERNELS} and cannot be capped to AVX2 (not x86); the bounded comparison still runs",
)
PRESET_SIZES = (256, 232, 520)  # classification resize 256 and 232 (crop 224), segmentation resize 520
# Fraction of preset values (uint8 levels before normalisation) that may differ from torch's own kernel,
# by 1 level. A flip needs the exact value within the two builds' float32 disagreement of an x.5 boundary;
# the largest disagreement seen between ATen builds on the photos (DEFAULT vs AVX2) is 4 ulp at 255,
# 6.1e-5 of a level, so even if every value disagreed that much about 6.1e-5 of them would flip.
# Measured (torch 2.14.1): 0 against AVX2 and AVX512 (which rounds like AVX2 here), 5.4e-6 against DEFAULT.
FLIP_BOUND = 1e-4


def _photo(name: str) -> np.ndarray:
    return getattr(skdata, name)()


def _tv_weights(key: str):
    builder, weights = key.split(".")
    return get_model_weights(builder)[weights]


def _to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()


def _to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).contiguous().numpy()


def _assert_same(mine: np.ndarray, ref: np.ndarray) -> None:
    assert mine.dtype == np.float32 and mine.shape == ref.shape
    diff = np.abs(mine - ref)
    assert diff.max() <= 1e-5, f"max abs diff {diff.max()}, {(diff > 1e-5).sum()} values off"
    assert np.array_equal(mine, ref), f"{(mine != ref).sum()} values not bitwise equal (max {diff.max()})"


def _tv_preset(size: int):
    """torchvision's preset at one of PRESET_SIZES."""
    if size == 520:
        return SemanticSegmentation(resize_size=520)
    return ImageClassification(crop_size=224, resize_size=size)


def _my_preset(size: int, kernel: str | None) -> Callable[[np.ndarray], np.ndarray]:
    return (
        T.segmentation_preset(520, kernel=kernel)
        if size == 520
        else T.classification_preset(size, 224, kernel=kernel)
    )


def _torch_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    y = Fnn.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).contiguous().numpy()


# ------------------------------------------------------------------------------------------------------
# torch's side of the exact tests: in-process, or computed at once by torch capped to AVX2
# ------------------------------------------------------------------------------------------------------

EDGE_SHAPES = [(1, 1, 3), (5, 7, 3), (223, 224, 3), (256, 256, 3), (20, 500, 3), (500, 20, 3), (257, 1000, 3)]
CROP_PAD_CASES = [(200, 224), (201, 224), (224, 224)]
WIDTH_ONE_CASES = [(83, 244, 201), (83, 1, 40), (50, 3, 7)]
# Without the extra a placeholder names the cases (which then skip): scikit-image holds the photo.
_CAMERA = skdata.camera() if HAVE_TORCH else np.zeros((1, 1), np.uint8)


def _edge_image(shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)


def _crop_pad_image(resize_size: int) -> np.ndarray:
    return np.random.default_rng(resize_size).integers(0, 256, size=(300, 211, 3), dtype=np.uint8)


def _width_one_input(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(h).standard_normal((h, w, 3)).astype(np.float32)


@functools.cache
def _random_resize_cases() -> list[tuple[np.ndarray, int, int]]:
    """Arbitrary float32 data (negative, non-integer, any scale) and sizes, up- and down-sampling."""
    rng = np.random.default_rng(0)
    cases = [(1, 1, 1, 1), (1, 5, 3, 2), (9, 9, 9, 4), (64, 64, 63, 65), (300, 13, 7, 300), (40, 700, 41, 33)]
    cases += [tuple(int(v) for v in rng.integers(2, 300, 4)) for _ in range(12)]
    out = []
    for h, w, oh, ow in cases:
        c = int(rng.integers(1, 5))
        out.append(
            ((rng.standard_normal((h, w, c)) * rng.choice([1e-3, 1.0, 1e4])).astype(np.float32), oh, ow)
        )
    out.append((rng.random((37, 53), dtype=np.float32), 20, 90))  # 2-D
    return out


def _ref_weights_transforms(key: str) -> np.ndarray:
    return _to_hwc(_tv_weights(key).transforms()(_to_chw(_photo("chelsea"))))


def _ref_photo_preset(photo: str, size: int) -> np.ndarray:
    return _to_hwc(_tv_preset(size)(_to_chw(_photo(photo))))


def _ref_photo_resize(photo: str, size: int) -> np.ndarray:
    return _to_hwc(TF.resize(_to_chw(_photo(photo)), [size], antialias=True))


def _ref_edge_shape(shape: tuple[int, int, int]) -> np.ndarray:
    return _to_hwc(ImageClassification(crop_size=224)(_to_chw(_edge_image(shape))))


def _ref_crop_pad(resize_size: int, crop_size: int) -> np.ndarray:
    tf = ImageClassification(crop_size=crop_size, resize_size=resize_size)
    return _to_hwc(tf(_to_chw(_crop_pad_image(resize_size))))


def _ref_max_size() -> np.ndarray:
    return _to_hwc(TF.resize(_to_chw(_photo("rocket")), [256], max_size=300, antialias=True))


def _ref_grayscale() -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(_CAMERA))[None].expand(3, -1, -1)
    return _to_hwc(ImageClassification(crop_size=224)(x.contiguous()))


def _ref_random_resize(i: int) -> np.ndarray:
    x, oh, ow = _random_resize_cases()[i]
    if x.ndim == 2:
        return _torch_resize(x[:, :, None], oh, ow)[:, :, 0]
    return _torch_resize(x, oh, ow)


def _ref_width_one(h: int, w: int, oh: int) -> np.ndarray:
    """The correct resize to width 1: what torch computes for a 2-wide copy of the columns."""
    horizontal = _torch_resize(_width_one_input(h, w), h, 1)
    return _torch_resize(np.repeat(horizontal, 2, axis=1), oh, 2)[:, :1]


def _reference_calls() -> list[tuple[Callable[..., np.ndarray], tuple]]:
    """Every torch output the exact tests take from ``torch_ref``: the capped subprocess computes these."""
    calls: list[tuple[Callable[..., np.ndarray], tuple]] = [
        (_ref_weights_transforms, (key,)) for key in sorted(T.EVAL_PRESETS)
    ]
    calls += [
        (fn, (p, s)) for p in PHOTOS for s in PRESET_SIZES for fn in (_ref_photo_preset, _ref_photo_resize)
    ]
    calls += [(_ref_edge_shape, (shape,)) for shape in EDGE_SHAPES]
    calls += [(_ref_crop_pad, args) for args in CROP_PAD_CASES]
    calls += [(_ref_max_size, ()), (_ref_grayscale, ())]
    calls += [(_ref_random_resize, (i,)) for i in range(len(_random_resize_cases()))]
    calls += [(_ref_width_one, args) for args in WIDTH_ONE_CASES]
    return calls


def _ref_key(fn: Callable[..., np.ndarray], args: tuple) -> str:
    return f"{fn.__name__}{args!r}"


def _write_references(path: str) -> None:
    """Run by the capped subprocess: every registered torch output, into one .npz."""
    calls = _reference_calls()
    arrays = {f"r{i}": np.asarray(fn(*args)) for i, (fn, args) in enumerate(calls)}
    keys = np.array([_ref_key(fn, args) for fn, args in calls])
    np.savez(path, capability=np.array(CAPABILITY), keys=keys, **arrays)


# Imports this file with torch capped to AVX2; the packages mbv3_jax and porting enter without their
# __init__ (jax, flax): transforms and calibration need only numpy and torch, and the import stays light.
_CAPPED_SCRIPT = textwrap.dedent(
    """
    import sys, types
    repo, out = sys.argv[1], sys.argv[2]
    sys.path[:0] = [repo + "/tests", repo]
    for name in ("mbv3_jax", "porting"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = [repo + "/" + name]
    import test_transforms
    test_transforms._write_references(out)
    """
)


def _capped_references(path: Path) -> dict[str, np.ndarray]:
    run_capped(
        ["-c", _CAPPED_SCRIPT, str(REPO), str(path)],
        {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"},
        300,
    )
    with np.load(path) as f:
        # the cap took: torch's dispatch ran the AVX2 build (on a CPU without AVX2 it would say less)
        assert str(f["capability"]) == "AVX2", f"ATEN_CPU_CAPABILITY=avx2 gave {f['capability']}"
        return {str(key): f[f"r{i}"] for i, key in enumerate(f["keys"])}


@pytest.fixture(scope="module")
def torch_ref(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., np.ndarray]:
    """``torch_ref(fn, *args)``: torch's output ``fn(*args)`` from the AVX2 or DEFAULT build that ``KERNEL``
    replays; in-process where torch runs one, else from one capped subprocess for the whole module."""
    if IN_PROCESS:
        registered = set(_reference_calls())

        def in_process(fn: Callable[..., np.ndarray], *args) -> np.ndarray:
            # keeps the registry whole here too, where the capped subprocess does not run
            assert (fn, args) in registered, f"{_ref_key(fn, args)} is missing from _reference_calls()"
            return fn(*args)

        return in_process
    refs = _capped_references(tmp_path_factory.mktemp("torch_avx2") / "references.npz")

    def capped(fn: Callable[..., np.ndarray], *args) -> np.ndarray:
        return refs[_ref_key(fn, args)]

    return capped


# ------------------------------------------------------------------------------------------------------
# presets on real photos
# ------------------------------------------------------------------------------------------------------


@needs_torch
@needs_kernel
@pytest.mark.parametrize("key", sorted(T.EVAL_PRESETS))
def test_preset_matches_torchvision_weights_transforms(key: str, torch_ref) -> None:
    """Each named preset equals ``weights.transforms()`` of the torchvision checkpoint."""
    ref_tf = _tv_weights(key).transforms()
    preset = T.EVAL_PRESETS[key]
    if isinstance(ref_tf, ImageClassification):
        assert preset == T.ClassificationPreset(ref_tf.crop_size[0], ref_tf.resize_size[0])
    else:
        assert isinstance(ref_tf, SemanticSegmentation)
        assert preset == T.SegmentationPreset(ref_tf.resize_size[0])
    mine = dataclasses.replace(preset, kernel=KERNEL)(_photo("chelsea"))  # the presets default to "avx2"
    _assert_same(mine, torch_ref(_ref_weights_transforms, key))


@needs_torch
@needs_kernel
@pytest.mark.parametrize("photo", PHOTOS)
def test_presets_match_torchvision_on_photos(photo: str, torch_ref) -> None:
    """Classification (resize 256 and 232, crop 224) and segmentation (resize 520) presets, bitwise.

    The rounding-sensitive step is the uint8 resize; on failure the message counts its differing values.
    """
    img = _photo(photo)
    for size in PRESET_SIZES:
        ref, mine = torch_ref(_ref_photo_preset, photo, size), _my_preset(size, KERNEL)(img)
        if not np.array_equal(mine, ref):
            ref_u8 = torch_ref(_ref_photo_resize, photo, size)
            n_u8 = int((T.resize_uint8(img, size, kernel=KERNEL) != ref_u8).sum())
            pytest.fail(
                f"{photo} resize {size}: {n_u8} uint8 values differ after resize; "
                f"max abs diff {np.abs(mine - ref).max()}"
            )


@needs_torch
def test_presets_within_bound_of_this_machines_torch() -> None:
    """Against torch's own kernel here, whatever its build: at most 1 level (of 255, before normalisation)
    on at most FLIP_BOUND of the values. Ours replays AVX2 (0 values differ where torch runs AVX2; where the
    accumulation order differs, a value within a few float32 ulps of x.5 rounds the other way)."""
    std = np.asarray(T.IMAGENET_STD, np.float32)
    n = flips = 0
    for photo in PHOTOS:
        img = _photo(photo)
        x = _to_chw(img)
        for size in PRESET_SIZES:
            ref, mine = _to_hwc(_tv_preset(size)(x)), _my_preset(size, "avx2")(img)
            assert mine.shape == ref.shape and mine.dtype == np.float32
            levels = np.abs(mine - ref) * 255 * std  # a 1-level flip is 1/255/std after normalisation
            assert levels.max() <= 1 + 1e-3, f"{photo} resize {size}: {levels.max():.3f} levels apart"
            n += mine.size
            flips += int((mine != ref).sum())
    assert flips <= FLIP_BOUND * n, f"{flips} of {n} values ({flips / n:.2e}) 1 level off torch {CAPABILITY}"


# ------------------------------------------------------------------------------------------------------
# synthetic edge cases
# ------------------------------------------------------------------------------------------------------


@needs_torch
@needs_kernel
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_classification_edge_shapes(shape: tuple[int, int, int], torch_ref) -> None:
    """Tiny (upsampled past the crop), exact-size (no resize), thin and wide images."""
    img = _edge_image(shape)
    _assert_same(T.classification_preset(kernel=KERNEL)(img), torch_ref(_ref_edge_shape, shape))


@needs_torch
@needs_kernel
@pytest.mark.parametrize("resize_size,crop_size", CROP_PAD_CASES)
def test_center_crop_pads_when_crop_exceeds_resize(resize_size: int, crop_size: int, torch_ref) -> None:
    """crop > resized image: torchvision zero-pads (uint8 0) before cropping; odd padding splits."""
    img = _crop_pad_image(resize_size)
    ref = torch_ref(_ref_crop_pad, resize_size, crop_size)
    _assert_same(T.classification_preset(resize_size, crop_size, kernel=KERNEL)(img), ref)


@needs_torch
@pytest.mark.parametrize("h,w", [(10, 7), (7, 10), (300, 300), (31, 1000)])
@pytest.mark.parametrize("crop", [(5, 5), (12, 9), (40, 3), (1, 1)])
def test_center_crop_matches_torchvision(h: int, w: int, crop: tuple[int, int]) -> None:
    img = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3).astype(np.uint8)
    ref = _to_hwc(TF.center_crop(_to_chw(img), list(crop)))
    np.testing.assert_array_equal(T.center_crop(img, *crop), ref)


@needs_torch
def test_resized_output_size_matches_torchvision() -> None:
    from torchvision.transforms.functional import _compute_resized_output_size

    for h, w in [(1, 1), (20, 500), (500, 20), (427, 640), (999, 1000), (1000, 3), (333, 334)]:
        for size in (1, 224, 232, 256, 520):
            for max_size in (None, size + 1, 1000):
                assert T.resized_output_size(h, w, size, max_size) == tuple(
                    _compute_resized_output_size((h, w), [size], max_size)
                ), (h, w, size, max_size)
    with pytest.raises(ValueError, match="max_size"):
        T.resized_output_size(10, 20, 256, max_size=256)


@needs_torch
@needs_kernel
def test_resize_uint8_max_size(torch_ref) -> None:
    img = _photo("rocket")
    np.testing.assert_array_equal(
        T.resize_uint8(img, 256, max_size=300, kernel=KERNEL), torch_ref(_ref_max_size)
    )


@needs_torch
@needs_kernel
@pytest.mark.parametrize("gray", [_CAMERA, _CAMERA[:, :, None]], ids=["HW", "HW1"])
def test_grayscale_is_replicated_to_rgb(gray: np.ndarray, torch_ref) -> None:
    """Documented choice: grayscale == the preset applied to the image repeated over 3 channels."""
    _assert_same(T.classification_preset(kernel=KERNEL)(gray), torch_ref(_ref_grayscale))


@needs_torch
def test_segmentation_without_resize() -> None:
    img = _photo("chelsea")
    ref = _to_hwc(SemanticSegmentation(resize_size=None)(_to_chw(img)))
    _assert_same(T.segmentation_preset(None)(img), ref)


def test_rejects_rgba_and_bad_shapes() -> None:
    preset = T.classification_preset()
    with pytest.raises(ValueError, match="alpha"):
        preset(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        preset(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(ValueError, match="HWC"):
        preset(np.zeros((2, 10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        preset(np.zeros((0, 10, 3), np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, np.bool_])
def test_rejects_non_uint8_naming_dtype(dtype: type) -> None:
    img = np.zeros((16, 16, 3), dtype=dtype)
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        T.classification_preset()(img)
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        T.segmentation_preset()(img)


def test_resize_bilinear_antialias_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="float64"):
        T.resize_bilinear_antialias(np.zeros((4, 4, 3)), 2, 2)
    with pytest.raises(ValueError, match="positive"):
        T.resize_bilinear_antialias(np.zeros((4, 4, 3), np.float32), 0, 2)
    with pytest.raises(ValueError, match="kernel"):
        T.resize_bilinear_antialias(np.zeros((4, 4, 3), np.float32), 2, 3, kernel="avx512")
    with pytest.raises(ValueError, match="kernel"):
        T.classification_preset(kernel="avx512")


# ------------------------------------------------------------------------------------------------------
# the float32 resize itself, bitwise
# ------------------------------------------------------------------------------------------------------


@needs_torch
@needs_kernel
def test_resize_bilinear_antialias_bitwise_random(torch_ref) -> None:
    """Arbitrary float32 data (negative, non-integer, any scale) and sizes, up- and down-sampling."""
    for i, (x, oh, ow) in enumerate(_random_resize_cases()):
        mine = T.resize_bilinear_antialias(x, oh, ow, kernel=KERNEL)
        ref = torch_ref(_ref_random_resize, i)
        assert mine.shape == ref.shape and mine.dtype == np.float32
        assert int((mine != ref).sum()) == 0, (x.shape, oh, ow)


@needs_torch
@needs_kernel
@pytest.mark.parametrize("h,w,oh", WIDTH_ONE_CASES)
def test_output_width_one_is_correct_not_torch(h: int, w: int, oh: int, torch_ref) -> None:
    """torch's vertical pass is wrong when the output width is 1 (every row gets row 0's weights);
    we return the correct resize, which is what torch computes for a 2-wide copy of the columns."""
    x = _width_one_input(h, w)
    np.testing.assert_array_equal(
        T.resize_bilinear_antialias(x, oh, 1, kernel=KERNEL), torch_ref(_ref_width_one, h, w, oh)
    )
    buggy = _torch_resize(
        x, oh, 1
    )  # torch here, whatever its build: the bug is in the loop, not the rounding
    assert (buggy == buggy[:1]).all()  # documents the torch bug; if this fails, torch fixed it


_OTHER_KERNEL_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np, torch
    import torch.nn.functional as Fnn
    spec = importlib.util.spec_from_file_location("transforms_under_test", sys.argv[1])
    T = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(T)  # by path: skips the package __init__ (jax), keeps this process light
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()

    def interp(x, oh, ow):  # x: float32 HWC
        t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        y = Fnn.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)
        return y[0].permute(1, 2, 0).numpy()

    bad = 0
    photos = np.load(sys.argv[2])
    for name in photos.files:  # torchvision's uint8 resize: float32 interpolate, round, cast
        img = photos[name]
        for size in (232, 520):
            oh, ow = T.resized_output_size(*img.shape[:2], size)
            ref = np.round(interp(img.astype(np.float32), oh, ow)).astype(np.uint8)
            bad += int((T.resize_uint8(img, size, kernel="default") != ref).sum())
    rng = np.random.default_rng(1)
    for h, w, oh, ow in [(50, 700, 20, 101), (333, 40, 700, 9), (5, 6, 223, 7)]:
        x = rng.standard_normal((h, w, 2)).astype(np.float32)
        bad += int((T.resize_bilinear_antialias(x, oh, ow, kernel="default") != interp(x, oh, ow)).sum())
    print("BAD", bad)
    """
)


@needs_torch
@pytest.mark.skipif(CAPABILITY == "DEFAULT", reason="already covered in-process")
def test_default_kernel_matches_torch_without_simd(tmp_path: Path) -> None:
    """``kernel="default"`` replays torch run with ``ATEN_CPU_CAPABILITY=default`` (no FMA contraction)."""
    photos = tmp_path / "photos.npz"
    np.savez(photos, rocket=_photo("rocket"))
    args = ["-c", _OTHER_KERNEL_SCRIPT, str(REPO / "mbv3_jax" / "transforms.py"), str(photos)]
    res = run_capped(args, {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}, 120)
    assert "BAD 0" in res.stdout, res.stdout


# ------------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------------


@needs_torch
def test_preprocess_batch_stacks_nhwc() -> None:
    imgs = [_photo("chelsea"), _photo("colorwheel"), skdata.camera()]
    key = "mobilenet_v3_large.IMAGENET1K_V2"
    batch = T.preprocess_batch(imgs, key)
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == np.float32
    for i, img in enumerate(imgs):
        np.testing.assert_array_equal(batch[i], T.EVAL_PRESETS[key](img))
    same = T.preprocess_batch([imgs[0], imgs[0]], T.segmentation_preset(100))
    assert same.shape == (2, 100, 150, 3)
    with pytest.raises(ValueError, match="different shapes"):
        T.preprocess_batch(imgs[:2], T.segmentation_preset(100))
    with pytest.raises(ValueError, match="no images"):
        T.preprocess_batch([], key)
    with pytest.raises(KeyError):
        T.preprocess_batch(imgs, "resnet50.IMAGENET1K_V1")


def test_module_imports_only_numpy_and_stdlib() -> None:
    """mbv3_jax never imports torch; transforms is host-side numpy (no jax either)."""
    tree = ast.parse((REPO / "mbv3_jax" / "transforms.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "math", "collections", "dataclasses", "typing", "numpy"}, roots


def test_preprocess_batch_refuses_one_image() -> None:
    """One HWC photo is not a batch: iterating it would make each pixel row an image."""
    photo = np.zeros((40, 60, 3), np.uint8)
    with pytest.raises(ValueError, match=r"got one array of shape \(40, 60, 3\): pass \[image\]"):
        T.preprocess_batch(photo, "mobilenet_v3_large.IMAGENET1K_V1")
