"""The shared parity harness: run a torchvision model and its mbv3_jax port on the same inputs and
compare every named output (logits, feature stages, ...) in NHWC.

Each model family provides an :class:`Adapter` (how to get named outputs from each side); the
comparison, the report and the table are shared.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

# The port's error against torchvision in float64 may be at most this multiple of torchvision's own
# fp32 error against it: the claim that holds on any machine, whatever its kernels' summation order.
NOISE_FLOOR_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Max abs error of ``got`` vs ``ref``, and the same relative to max|ref| (the parity metric).

    With a float64 reference: ``torch_f64`` is torchvision fp32's own error against torchvision in
    float64 (the noise floor) and ``port_f64`` the port's, both relative to max|float64 output|.
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    ref_scale: float
    torch_f64: float | None = None
    port_f64: float | None = None

    @property
    def relative(self) -> float:
        return self.max_abs / self.ref_scale if self.ref_scale > 0 else self.max_abs

    @property
    def noise_ratio(self) -> float | None:
        """The port's float64 error over torchvision fp32's (<= NOISE_FLOOR_FACTOR is the claim)."""
        if self.port_f64 is None or self.torch_f64 is None:
            return None
        return (
            self.port_f64 / self.torch_f64 if self.torch_f64 > 0 else (0.0 if self.port_f64 == 0 else np.inf)
        )


def _relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """||got - ref|| / ||ref|| (L2 over all elements)."""
    scale = float(np.linalg.norm(ref.ravel()))
    err = float(np.linalg.norm((got - ref).ravel()))
    return err / scale if scale > 0 else err


def compare(name: str, ref: Any, got: Any, ref64: Any = None) -> Comparison:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"{name}: shapes differ, reference {ref.shape} vs JAX {got.shape}")
    torch_f64 = port_f64 = None
    if ref64 is not None:
        ref64 = np.asarray(ref64, np.float64)
        torch_f64, port_f64 = _relative_error(ref64, ref), _relative_error(ref64, got)
    return Comparison(
        name,
        ref.shape,
        float(np.max(np.abs(ref - got), initial=0.0)),
        float(np.max(np.abs(ref), initial=0.0)),
        torch_f64,
        port_f64,
    )


def float64_copy(tv_model: torch.nn.Module) -> torch.nn.Module:
    """torchvision's model in float64: the reference against which fp32 rounding is measured."""
    return copy.deepcopy(tv_model).double().eval()


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


Counts = tuple[int, int]  # (agreeing, total)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How to get named outputs (NHWC numpy) from a torchvision model and from its port.

    ``primary`` names the output the table reports; ``agreements`` counts, per metric, how many
    predictions agree (top-1 classes, argmax pixels, ...) between reference and port.
    """

    # (model, NCHW / NHWC input, with_stages) -> {name: NHWC array}
    torch_outputs: Callable[[torch.nn.Module, torch.Tensor, bool], dict[str, np.ndarray]]
    jax_outputs: Callable[[nnx.Module, jax.Array, bool], dict[str, np.ndarray]]
    primary: str = "logits"
    agreements: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, Counts]] | None = None


def _classifier_torch_outputs(model: torch.nn.Module, x: torch.Tensor, stages: bool) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        if stages:
            y = x
            for i, layer in enumerate(model.features):
                y = layer(y)
                out[f"features.{i}"] = nchw_to_nhwc(y)
        out["logits"] = model(x).numpy()
    return out


def _classifier_jax_outputs(model: nnx.Module, x: jax.Array, stages: bool) -> dict[str, np.ndarray]:
    out = {}
    if stages:
        feats = model.extract_features(x, range(model.num_stages))
        out = {f"features.{i}": np.asarray(v) for i, v in feats.items()}
    out["logits"] = np.asarray(model(x))
    return out


def _classifier_agreements(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Counts]:
    ref_top = np.argsort(-ref["logits"], axis=-1, kind="stable")[:, :5]
    got_top = np.argsort(-got["logits"], axis=-1, kind="stable")[:, :5]
    n = len(ref_top)
    return {
        "top-1": (int(np.sum(ref_top[:, 0] == got_top[:, 0])), n),
        "top-5": (int(np.sum(np.all(ref_top == got_top, axis=-1))), n),
    }


def _segmentation_torch_outputs(
    model: torch.nn.Module, x: torch.Tensor, stages: bool
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        y = x
        for i, layer in model.backbone.items() if stages else ():  # IntermediateLayerGetter: 0..16
            y = layer(y)
            out[f"backbone.{i}"] = nchw_to_nhwc(y)
        for key, value in model(x).items():
            out[key] = nchw_to_nhwc(value)
    return out


def _segmentation_jax_outputs(model: nnx.Module, x: jax.Array, stages: bool) -> dict[str, np.ndarray]:
    out = {}
    if stages:
        feats = model.extract_features(x, range(len(model.backbone)))
        out = {f"backbone.{i}": np.asarray(v) for i, v in feats.items()}
    out.update({k: np.asarray(v) for k, v in model(x).items()})
    return out


def _segmentation_agreements(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Counts]:
    counts = {}
    for key in ("out", "aux"):
        if key in ref:
            same = np.argmax(ref[key], axis=-1) == np.argmax(got[key], axis=-1)
            counts["pixels" if key == "out" else "aux pixels"] = (int(same.sum()), int(same.size))
    return counts


CLASSIFIER = Adapter(_classifier_torch_outputs, _classifier_jax_outputs, "logits", _classifier_agreements)
SEGMENTATION = Adapter(
    _segmentation_torch_outputs, _segmentation_jax_outputs, "out", _segmentation_agreements
)

FLOAT64_MATCHED_BY_TV = "float64 dets matched by torchvision"
FLOAT64_MATCHED_BY_JAX = "float64 dets matched by JAX"

# builder name -> adapter; later model families register theirs.
ADAPTERS: dict[str, Adapter] = {
    "mobilenet_v3_large": CLASSIFIER,
    "mobilenet_v3_small": CLASSIFIER,
    "MobileNetV3": CLASSIFIER,
    "lraspp_mobilenet_v3_large": SEGMENTATION,
    "deeplabv3_mobilenet_v3_large": SEGMENTATION,
    "fcn_mobilenet_v3_large": SEGMENTATION,
}


@dataclasses.dataclass
class ParityReport:
    model: str
    params: int
    batch_shape: tuple[int, ...]
    comparisons: list[Comparison]
    primary: str = "logits"
    agreements: dict[str, Counts] = dataclasses.field(default_factory=dict)
    jax_seconds: float | None = None
    torch_seconds: float | None = None
    outputs: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list, repr=False)

    def get(self, name: str) -> Comparison:
        for c in self.comparisons:
            if c.name == name:
                return c
        raise KeyError(name)

    def missed(self, metric: str) -> int:
        agree, total = self.agreements[metric]
        return total - agree

    def agreement(self, metric: str) -> float:
        agree, total = self.agreements[metric]
        return agree / total if total else 1.0

    @property
    def top1_agreement(self) -> float | None:
        return self.agreement("top-1") if "top-1" in self.agreements else None

    @property
    def topk_agreement(self) -> float | None:
        return self.agreement("top-5") if "top-5" in self.agreements else None

    @property
    def worst_relative(self) -> float:
        return max(c.relative for c in self.comparisons)

    def noise_floor_excess(self) -> list[str]:
        """What exceeds NOISE_FLOOR_FACTOR x torchvision fp32's own error against its float64 run
        (empty: the port is as close to float64 as torchvision is, within the factor). Outputs:
        relative L2 errors; detections: float64 detections left unmatched."""
        excess = [
            f"{c.name}: port {c.port_f64:.2e} vs torchvision fp32 {c.torch_f64:.2e} (L2, relative to float64)"
            for c in self.comparisons
            if c.noise_ratio is not None and c.noise_ratio > NOISE_FLOOR_FACTOR
        ]
        if FLOAT64_MATCHED_BY_JAX in self.agreements:
            port, tv = (self.missed(k) for k in (FLOAT64_MATCHED_BY_JAX, FLOAT64_MATCHED_BY_TV))
            if port > NOISE_FLOOR_FACTOR * tv:
                excess.append(f"float64 detections missed: port {port}, torchvision fp32 {tv}")
        return excess

    @property
    def noise_floor_measured(self) -> bool:
        return FLOAT64_MATCHED_BY_JAX in self.agreements or any(
            c.noise_ratio is not None for c in self.comparisons
        )


def count_params(model: nnx.Module) -> int:
    return int(sum(np.size(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _max_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


def _merge(a: Comparison, b: Comparison) -> Comparison:
    """The worst of two batches' comparisons (relative errors per batch, so a small-output batch
    is not hidden by a large one)."""
    return Comparison(
        a.name,
        a.shape,
        max(a.max_abs, b.max_abs),
        max(a.ref_scale, b.ref_scale),
        _max_or_none(a.torch_f64, b.torch_f64),
        _max_or_none(a.port_f64, b.port_f64),
    )


def run_parity(
    name: str,
    tv_model: torch.nn.Module,
    jax_model: nnx.Module,
    images_nhwc: np.ndarray | Sequence[np.ndarray],
    *,
    adapter: Adapter | None = None,
    stages: bool = True,
    timing_repeats: int = 0,
    keep_outputs: bool = False,
    float64_reference: bool = True,
) -> ParityReport:
    """Compare every output of the two models (both in eval mode) on the same float NHWC images.

    ``images_nhwc`` is one batch, or a list of batches (e.g. one per photo size); errors are then
    the worst over all batches and agreements are summed. ``stages=False`` compares only the
    model outputs (not every backbone stage). ``keep_outputs`` keeps both sides' primary outputs
    in ``report.outputs`` (per batch; for figures). Timings use the first batch.
    ``float64_reference`` also runs torchvision in float64 and measures both fp32 sides against it.
    """
    adapter = adapter or ADAPTERS[jax_model.architecture["builder"]]
    tv_model.eval()
    jax_model.eval()
    batches = [images_nhwc] if isinstance(images_nhwc, np.ndarray) else list(images_nhwc)
    comparisons: dict[str, Comparison] = {}
    agreements: dict[str, Counts] = {}
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    tv64 = float64_copy(tv_model) if float64_reference else None
    for batch in batches:
        x_np = np.ascontiguousarray(batch, dtype=np.float32)
        x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
        ref = adapter.torch_outputs(tv_model, x_torch, stages)
        ref64 = adapter.torch_outputs(tv64, x_torch.double(), stages) if tv64 is not None else {}
        got = adapter.jax_outputs(jax_model, jnp.asarray(x_np), stages)
        if keep_outputs:
            kept.append((ref[adapter.primary], got[adapter.primary]))
        missing = ref.keys() ^ got.keys()
        if missing:
            raise ValueError(f"{name}: outputs present on one side only: {sorted(missing)}")
        for k in ref:
            c = compare(k, ref[k], got[k], ref64.get(k))
            comparisons[k] = _merge(comparisons[k], c) if k in comparisons else c
        if adapter.agreements is not None:
            for metric, (agree, total) in adapter.agreements(ref, got).items():
                a0, t0 = agreements.get(metric, (0, 0))
                agreements[metric] = (a0 + agree, t0 + total)
    first = np.ascontiguousarray(batches[0], dtype=np.float32)
    report = ParityReport(
        name,
        count_params(jax_model),
        tuple(first.shape),
        list(comparisons.values()),
        adapter.primary,
        agreements,
    )
    report.outputs = kept
    if timing_repeats:
        x_jax = jnp.asarray(first)
        x_torch = torch.from_numpy(first).permute(0, 3, 1, 2).contiguous()
        report.jax_seconds = median_seconds(lambda: jax.block_until_ready(jax_model(x_jax)), timing_repeats)
        with torch.inference_mode():
            report.torch_seconds = median_seconds(lambda: tv_model(x_torch), timing_repeats)
    return report


def _format_agreements(report: ParityReport) -> str:
    parts = []
    for metric in report.agreements:
        frac = report.agreement(metric)
        parts.append(f"{metric} {'100%' if frac == 1.0 else f'{100 * frac:.4f}%'}")
    return ", ".join(parts) or "-"


def _format_noise_floor(report: ParityReport) -> str:
    """torchvision fp32's / the port's error against torchvision float64 (primary output, L2)."""
    c = report.get(report.primary)
    if c.noise_ratio is None:
        return "-"
    return f"{c.torch_f64:.1e}/{c.port_f64:.1e}"


def format_table(reports: Sequence[ParityReport]) -> str:
    """A plain-text table: params, max abs / relative error of the primary output, worst output,
    both sides' error against torchvision in float64, agreement of the predictions, timings."""
    header = (
        f"{'model':<30} {'params':>11} {'output':>7} {'max abs err':>12} {'rel err':>9} {'worst':>9} "
        f"{'f64 tv/JAX':>15} {'JAX ms':>8} {'torch ms':>9}  agreement"
    )
    lines = [header, "-" * (len(header) + 24)]
    for r in reports:
        c = r.get(r.primary)

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{1000 * v:.1f}"

        lines.append(
            f"{r.model:<30} {r.params:>11,} {r.primary:>7} {c.max_abs:>12.2e} {c.relative:>9.1e} "
            f"{r.worst_relative:>9.1e} {_format_noise_floor(r):>15} {ms(r.jax_seconds):>8} "
            f"{ms(r.torch_seconds):>9}  {_format_agreements(r)}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Tensor-set comparisons (train-mode statistics, gradients), shared by the parity tests.


# Parity tolerances in float64. Gradients: torch's float64 hardsigmoid backward multiplies by 1/6
# rounded to float32 (a relative error of 3.0e-8 on every SE gate's gradient), which bounds how close
# the two sides can be.
FLOAT64_GRAD_TOL = 1e-6
# float64 outputs and running statistics: only summation order differs.
FLOAT64_TOL = 1e-10


def assert_close_tensors(ref: dict, got: dict, tol: float, what: str) -> float:
    """Every tensor of ``got`` within ``tol`` x max|ref| of ``ref`` (same keys); the worst relative error."""
    assert ref.keys() == got.keys(), f"{what}: different sets of tensors"
    worst = 0.0
    for path, r in ref.items():
        g = got[path]
        scale = float(np.max(np.abs(r)))
        err = float(np.max(np.abs(np.asarray(r, np.float64) - g))) / (scale if scale > 0 else 1.0)
        name = ".".join(map(str, path)) if isinstance(path, tuple) else path
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"
        worst = max(worst, err)
    return worst


def assert_close_gradients(ref: dict, got: dict, tol: float, zero_tol: float = 1e-12) -> float:
    """Gradients within ``tol`` relative, per tensor; the worst relative error.

    BatchNorm biases directly followed by a train-mode BatchNorm (a projection BN before the next
    block's normalisation) have a gradient that is exactly zero in exact arithmetic; both sides
    give rounding noise there, where a relative error means nothing. Those are checked against
    the global gradient scale (``zero_tol``) instead.
    """
    assert ref.keys() == got.keys(), "gradients: different sets of tensors"
    global_scale = max(float(np.max(np.abs(g))) for g in ref.values())
    zero = {p for p, g in ref.items() if np.max(np.abs(g)) <= zero_tol * global_scale}
    for p in zero:
        assert np.max(np.abs(got[p])) <= zero_tol * global_scale, f"gradient {p} should be ~0"
    assert len(zero) < len(ref) // 4, f"{len(zero)} of {len(ref)} gradients are ~0: a broken test setup"
    nonzero = {p: g for p, g in ref.items() if p not in zero}
    return assert_close_tensors(nonzero, {p: got[p] for p in nonzero}, tol, "gradient")


# ------------------------------------------------------------------------------------------------
# Detections


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_detections(
    ref: dict[str, Any], got: dict[str, Any], iou: float = 0.99, score_tol: float = 1e-4
) -> tuple[int, int]:
    """How many of ``ref``'s detections have a detection in ``got`` with the same label, IoU >=
    ``iou`` and |score difference| <= ``score_tol``: (matched, total). Call both ways."""
    rb, rs, rl = (np.asarray(ref[k]) for k in ("boxes", "scores", "labels"))
    gb, gs, gl = (np.asarray(got[k]) for k in ("boxes", "scores", "labels"))
    if len(rb) == 0:
        return 0, 0
    if len(gb) == 0:
        return 0, len(rb)
    ok = (
        (_iou_matrix(rb, gb) >= iou)
        & (rl[:, None] == gl[None, :])
        & (np.abs(rs[:, None] - gs[None, :]) <= score_tol)
    )
    return int(ok.any(axis=1).sum()), len(rb)


def _matched_pairs(ref: dict[str, Any], got: dict[str, Any], iou: float) -> list[tuple[int, int]]:
    """(ref index, got index) of the best same-label IoU match of each ref detection, if >= ``iou``."""
    rb, rl, gb, gl = (np.asarray(x) for x in (ref["boxes"], ref["labels"], got["boxes"], got["labels"]))
    if len(rb) == 0 or len(gb) == 0:
        return []
    ious = np.where(rl[:, None] == gl[None, :], _iou_matrix(rb, gb), -1.0)
    best = np.argmax(ious, axis=1)
    return [(i, int(j)) for i, j in enumerate(best) if ious[i, j] >= iou]


def _detections(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
    with torch.no_grad():
        return [{k: v.numpy() for k, v in r.items()} for r in model(images)]


def _count_matches(
    counts: dict[str, Counts], key: str, refs: Sequence[dict[str, Any]], gots: Sequence[dict[str, Any]]
) -> None:
    for r, g in zip(refs, gots, strict=True):
        m, t = match_detections(r, g)
        counts[key] = (counts.get(key, (0, 0))[0] + m, counts.get(key, (0, 0))[1] + t)


def run_detection_parity(
    name: str,
    tv_model: torch.nn.Module,
    jax_model: nnx.Module,
    photos: Sequence[np.ndarray],
    *,
    timing_repeats: int = 0,
    keep_outputs: bool = False,
    float64_reference: bool = True,
) -> ParityReport:
    """Both detectors (eval) on uint8 HWC photos as one batch: detections matched both ways (same
    label, IoU >= 0.99, |score diff| <= 1e-4), and the box / score errors of the matched pairs.

    ``float64_reference`` also counts how many of torchvision's float64 detections torchvision fp32
    and the port each match (agreements FLOAT64_MATCHED_BY_TV / FLOAT64_MATCHED_BY_JAX).
    """
    tv_model.eval()
    jax_model.eval()
    images_t = [torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1).float() / 255 for p in photos]
    images_j = [np.asarray(p, np.float32) / np.float32(255) for p in photos]
    ref = _detections(tv_model, images_t)
    got = jax_model(images_j)
    agreements: dict[str, Counts] = {}
    _count_matches(agreements, "torchvision dets matched", ref, got)
    _count_matches(agreements, "JAX dets matched", got, ref)
    if float64_reference:
        ref64 = _detections(float64_copy(tv_model), [x.double() for x in images_t])
        _count_matches(agreements, FLOAT64_MATCHED_BY_TV, ref64, ref)
        _count_matches(agreements, FLOAT64_MATCHED_BY_JAX, ref64, got)
    box_err = score_err = box_scale = 0.0
    for r, g in zip(ref, got, strict=True):
        for i, j in _matched_pairs(r, g, 0.99):
            box_err = max(box_err, float(np.max(np.abs(r["boxes"][i] - g["boxes"][j]))))
            score_err = max(score_err, float(abs(r["scores"][i] - g["scores"][j])))
        if len(r["boxes"]):
            box_scale = max(box_scale, float(np.max(np.abs(r["boxes"]))))
    n = sum(len(r["boxes"]) for r in ref)
    comparisons = [
        Comparison("boxes", (n, 4), box_err, box_scale),
        Comparison("scores", (n,), score_err, 1.0),
    ]
    report = ParityReport(name, count_params(jax_model), (len(photos),), comparisons, "boxes", agreements)
    if keep_outputs:
        report.outputs = [(ref, got)]
    if timing_repeats:
        report.jax_seconds = median_seconds(lambda: jax_model(images_j), timing_repeats)
        with torch.inference_mode():
            report.torch_seconds = median_seconds(lambda: tv_model(images_t), timing_repeats)
    return report
