"""The shared parity harness: run a torchvision model and its mbv3_jax port on the same inputs and
compare every named output (logits, feature stages, ...) in NHWC.

Each model family provides an :class:`Adapter` (how to get named outputs from each side); the
comparison, the report and the table are shared.
"""

from __future__ import annotations

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


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Max abs error of ``got`` vs ``ref``, and the same relative to max|ref| (the parity metric)."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    ref_scale: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.ref_scale if self.ref_scale > 0 else self.max_abs


def compare(name: str, ref: Any, got: Any) -> Comparison:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"{name}: shapes differ, reference {ref.shape} vs JAX {got.shape}")
    return Comparison(
        name,
        ref.shape,
        float(np.max(np.abs(ref - got), initial=0.0)),
        float(np.max(np.abs(ref), initial=0.0)),
    )


def nchw_to_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def topk_agreement(ref_logits: np.ndarray, got_logits: np.ndarray, k: int = 5) -> tuple[float, float]:
    """(fraction with the same top-1, fraction with the same ordered top-k)."""
    ref_top = np.argsort(-ref_logits, axis=-1, kind="stable")[:, :k]
    got_top = np.argsort(-got_logits, axis=-1, kind="stable")[:, :k]
    return float(np.mean(ref_top[:, 0] == got_top[:, 0])), float(np.mean(np.all(ref_top == got_top, axis=-1)))


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How to get named outputs (NHWC numpy) from a torchvision model and from its port."""

    torch_outputs: Callable[[torch.nn.Module, torch.Tensor], dict[str, np.ndarray]]
    jax_outputs: Callable[[nnx.Module, jax.Array], dict[str, np.ndarray]]
    primary: str = "logits"


def _classifier_torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        y = x
        for i, layer in enumerate(model.features):
            y = layer(y)
            out[f"features.{i}"] = nchw_to_nhwc(y)
        out["logits"] = model(x).numpy()
    return out


def _classifier_jax_outputs(model: nnx.Module, x: jax.Array) -> dict[str, np.ndarray]:
    feats = model.extract_features(x, range(model.num_stages))
    out = {f"features.{i}": np.asarray(v) for i, v in feats.items()}
    out["logits"] = np.asarray(model(x))
    return out


CLASSIFIER = Adapter(_classifier_torch_outputs, _classifier_jax_outputs)

# builder name -> adapter; later model families register theirs.
ADAPTERS: dict[str, Adapter] = {
    "mobilenet_v3_large": CLASSIFIER,
    "mobilenet_v3_small": CLASSIFIER,
    "MobileNetV3": CLASSIFIER,
}


@dataclasses.dataclass
class ParityReport:
    model: str
    params: int
    batch_shape: tuple[int, ...]
    comparisons: list[Comparison]
    top1_agreement: float | None = None
    topk_agreement: float | None = None
    jax_seconds: float | None = None
    torch_seconds: float | None = None

    def get(self, name: str) -> Comparison:
        for c in self.comparisons:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def worst_relative(self) -> float:
        return max(c.relative for c in self.comparisons)


def count_params(model: nnx.Module) -> int:
    return int(sum(np.size(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


def run_parity(
    name: str,
    tv_model: torch.nn.Module,
    jax_model: nnx.Module,
    images_nhwc: np.ndarray,
    *,
    adapter: Adapter | None = None,
    timing_repeats: int = 0,
) -> ParityReport:
    """Compare every output of the two models (both in eval mode) on the same float NHWC images."""
    adapter = adapter or ADAPTERS[jax_model.architecture["builder"]]
    tv_model.eval()
    jax_model.eval()
    x_np = np.ascontiguousarray(images_nhwc, dtype=np.float32)
    x_torch = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    x_jax = jnp.asarray(x_np)
    ref = adapter.torch_outputs(tv_model, x_torch)
    got = adapter.jax_outputs(jax_model, x_jax)
    missing = ref.keys() ^ got.keys()
    if missing:
        raise ValueError(f"{name}: outputs present on one side only: {sorted(missing)}")
    report = ParityReport(
        name, count_params(jax_model), tuple(x_np.shape), [compare(k, ref[k], got[k]) for k in ref]
    )
    primary = adapter.primary
    if primary == "logits":
        report.top1_agreement, report.topk_agreement = topk_agreement(ref["logits"], got["logits"])
    if timing_repeats:
        report.jax_seconds = median_seconds(lambda: jax.block_until_ready(jax_model(x_jax)), timing_repeats)
        with torch.inference_mode():
            report.torch_seconds = median_seconds(lambda: tv_model(x_torch), timing_repeats)
    return report


def format_table(reports: Sequence[ParityReport], primary: str = "logits") -> str:
    """A plain-text table: params, max abs / relative error, top-1/top-5 agreement, timings."""
    header = (
        f"{'model':<44} {'params':>11} {'max abs err':>12} {'rel err':>9} {'worst stage':>9} "
        f"{'top-1':>6} {'top-5':>6} {'JAX ms':>8} {'torch ms':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        c = r.get(primary)

        def pct(v: float | None) -> str:
            return "-" if v is None else f"{100 * v:.0f}%"

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{1000 * v:.1f}"

        lines.append(
            f"{r.model:<44} {r.params:>11,} {c.max_abs:>12.2e} {c.relative:>9.1e} {r.worst_relative:>9.1e} "
            f"{pct(r.top1_agreement):>6} {pct(r.topk_agreement):>6} "
            f"{ms(r.jax_seconds):>8} {ms(r.torch_seconds):>9}"
        )
    return "\n".join(lines)
