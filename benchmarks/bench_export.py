"""Exported artifacts vs the JAX model vs torchvision, side by side on the CPU (fp32).

For each model and batch size: the model exported by ``mbv3_jax.export`` to LiteRT (.tflite, run by
``ai_edge_litert``'s Interpreter, whose default CPU delegate is XNNPACK) and to ONNX (run by ONNX
Runtime's CPU execution provider), the JAX model itself (the plain ``model(x)`` call, jitted, with the
CPU rewrites), torchvision eager (NCHW) and ``torch.compile`` (inductor, freezing, under no_grad).
All five hold the same (random) weights and get the same input; the runtimes that take a thread count
get the machine's cores. One process, the rows take turns (one ~0.5 s block of each per round) and
the script prints medians, each row's ratio to the JAX row, and the largest difference of each row's
output from JAX's (relative to max |JAX|: the weights are the same on every side).

Exports (fixed batch and input size: TFLite and ONNX artifacts have a fixed shape, so one per model
and batch) run first, in a child process, into a temporary directory: TensorFlow and jax2onnx are
then not loaded in the timing process. Export time and each row's first call (JAX and
``torch.compile`` compile; LiteRT / ONNX Runtime session set-up) are printed apart.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/bench_export.py
    .venv/bin/python benchmarks/bench_export.py --models mobilenet_v3_small --batches 1 --repeats 3
    .venv/bin/python benchmarks/bench_export.py --quick          # a smoke run: small inputs, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_classifiers import interleave, torch_runner
from bench_common import print_environment

import mbv3_jax
from porting import load_torchvision
from porting.torchvision_io import build_torchvision_model

SEGMENTATION = ("lraspp_mobilenet_v3_large",)
MODELS = ("mobilenet_v3_large", "mobilenet_v3_small", *SEGMENTATION)
RUNTIMES = {
    "litert": "LiteRT (XNNPACK)",
    "onnxruntime": "ONNX Runtime",
    "jax": "JAX model(x)",
    "torch_eager": "torch eager NCHW",
    "torch_compile": "torch.compile",
    # not in the default set: LiteRT with its built-in kernels only (no default delegate)
    "litert_builtin": "LiteRT (no XNNPACK)",
}
DEFAULT_RUNTIMES = ("litert", "onnxruntime", "jax", "torch_eager", "torch_compile")
EXPORT_CHILD = """
import json, sys, time
from mbv3_jax import export
for job in json.loads(sys.argv[1]):
    t = time.perf_counter()
    export.export(job["source"], job["out"], job["format"], input_size=job["size"], batch=job["batch"])
    print(json.dumps({"out": job["out"], "s": time.perf_counter() - t}), flush=True)
"""


@contextlib.contextmanager
def captured_fd2() -> Iterator[list[str]]:
    """What native code writes to file descriptor 2 inside the block (LiteRT logs its delegate there),
    as one string appended to the yielded list; it is echoed to stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    text: list[str] = []
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text.append(f.read().decode(errors="replace"))
            sys.stderr.write(text[-1])


def litert_runner(path: Path, x: np.ndarray, threads: int, default_delegates: bool = True):
    """(run, log): one call of the .tflite artifact through the Interpreter's signature runner (input
    copied in, outputs copied out), and what LiteRT logged while building the interpreter and running
    it once (it names the XNNPACK delegate when that is applied)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if default_delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with captured_fd2() as log:
        interp = Interpreter(
            model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver
        )
        runner = interp.get_signature_runner()
        runner(images=x)

    def run():
        return runner(images=x)

    return run, log[0]


def onnxruntime_runner(path: Path, x: np.ndarray, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run():
        return dict(zip(names, session.run(names, {"images": x}), strict=True))

    return run


def main_output(out, nchw: bool = False) -> np.ndarray:
    """The logits (classifiers) or the "out" map (segmentation) as a NHWC / (N, classes) array."""
    if isinstance(out, dict):
        out = out["logits"] if "logits" in out else out["out"]
    out = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out)
    return out.transpose(0, 2, 3, 1) if nchw and out.ndim == 4 else out


def build(name: str) -> tuple[object, torch.nn.Module]:
    """The JAX model and the torchvision model with the same random weights (torchvision's init)."""
    torch.manual_seed(0)
    tv = build_torchvision_model(mbv3_jax.get_model(name).architecture).eval()
    return load_torchvision(name, tv.state_dict()), tv


def export_all(jobs: list[dict]) -> dict[str, float]:
    """Run the exports in a child process; seconds per artifact."""
    if not jobs:
        return {}
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_CHILD, json.dumps(jobs)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        env={"TF_CPP_MIN_LOG_LEVEL": "2"} | dict(os.environ),
    )
    if proc.returncode:
        sys.exit(f"export failed (exit status {proc.returncode}; its error is above)")
    times = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {t["out"]: t["s"] for t in times}


def bench_one(
    name: str,
    model,
    tv: torch.nn.Module,
    batch: int,
    size: int,
    artifacts: dict[str, Path],
    runtimes: list[str],
    rounds: int,
    block_s: float,
    threads: int,
) -> tuple[dict[str, float], dict[str, float], dict[str, float], str]:
    """(median s per call, first-call s, max |row - JAX| / max |JAX|, LiteRT's log) per runtime.

    First call: set-up (LiteRT interpreter, ONNX Runtime session) plus the first call (JAX and
    ``torch.compile``: their compile)."""
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    x_jax = jnp.asarray(x)
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    fns: dict[str, Callable[[], object]] = {}
    setup: dict[str, float] = {}
    log = ""
    for rt in runtimes:
        t0 = time.perf_counter()
        if rt == "litert":
            fns[rt], log = litert_runner(artifacts["tflite"], x, threads)
        elif rt == "litert_builtin":
            fns[rt], _ = litert_runner(artifacts["tflite"], x, threads, default_delegates=False)
        elif rt == "onnxruntime":
            fns[rt] = onnxruntime_runner(artifacts["onnx"], x, threads)
        elif rt == "jax":
            fns[rt] = lambda: jax.block_until_ready(model(x_jax))
        elif rt == "torch_eager":
            fns[rt] = torch_runner(tv, x_torch, "eager")
        elif rt == "torch_compile":
            fns[rt] = torch_runner(tv, x_torch, "compile")
        setup[rt] = time.perf_counter() - t0  # LiteRT / ONNX Runtime: interpreter or session set-up
    s, first = interleave(fns, rounds, block_s)
    first = {rt: first[rt] + setup[rt] for rt in fns}
    want = main_output(model(x_jax))
    scale = float(np.max(np.abs(want)))
    diff = {
        rt: float(np.max(np.abs(main_output(fn(), nchw=rt.startswith("torch")) - want))) / scale
        for rt, fn in fns.items()
    }
    return s, first, diff, log


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="classifiers (default: 1 32)")
    parser.add_argument("--seg-batches", nargs="+", type=int, default=None, help="segmentation (default: 1)")
    parser.add_argument("--size", type=int, default=None, help="classifier input size (default 224)")
    parser.add_argument("--seg-size", type=int, default=None, help="segmentation input size (default 520)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="rounds of timed blocks (median; default 7)"
    )
    parser.add_argument("--runtimes", nargs="+", choices=list(RUNTIMES), default=list(DEFAULT_RUNTIMES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: all cores")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 96 / 128 px, batch 1, 1 round of 0.1 s blocks"
    )
    args = parser.parse_args()
    q = args.quick
    batches = args.batches or ([1] if q else [1, 32])
    seg_batches = args.seg_batches or [1]
    size = args.size or (96 if q else 224)
    seg_size = args.seg_size or (128 if q else 520)
    rounds = args.repeats or (1 if q else 7)
    block_s = 0.1 if q else 0.5
    runtimes = list(dict.fromkeys(args.runtimes))
    if "jax" not in runtimes:
        runtimes.insert(0, "jax")  # the reference row
    print_environment("NCHW")
    torch.set_num_threads(args.threads)
    print(
        f"threads: LiteRT num_threads={args.threads}, ONNX Runtime intra_op_num_threads={args.threads}, "
        f"torch {torch.get_num_threads()}, XLA:CPU its default (all {os.cpu_count()} cores); "
        f"{rounds} rounds of ~{block_s} s blocks"
    )
    configs = [
        (name, b, seg_size if name in SEGMENTATION else size)
        for name in args.models
        for b in (seg_batches if name in SEGMENTATION else batches)
    ]
    formats = [
        f
        for f, rts in (("tflite", ("litert", "litert_builtin")), ("onnx", ("onnxruntime",)))
        if set(rts) & set(runtimes)
    ]
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        tmp = Path(tmp)
        models, jobs, artifacts = {}, [], {}
        for name in dict.fromkeys(n for n, _, _ in configs):
            models[name] = build(name)
            if formats:
                mbv3_jax.save(models[name][0], tmp / name)
        for name, b, sz in configs:
            for fmt in formats:
                out = tmp / f"{name}_b{b}_{sz}.{fmt}"
                artifacts[name, b, fmt] = out
                jobs.append(dict(source=str(tmp / name), out=str(out), format=fmt, size=sz, batch=b))
        print(
            f"exporting {len(jobs)} artifacts ({', '.join(formats) or 'none'}) in a child process ...",
            flush=True,
        )
        export_s = export_all(jobs)
        header = (
            f"  {'runtime':<22} {'img/s':>9} {'ms/batch':>9} {'x JAX':>7} {'first call s':>13} "
            f"{'export s':>9} {'max|d|/max|JAX|':>16}"
        )
        for name, b, sz in configs:
            model, tv = models[name]
            arts = {fmt: artifacts[name, b, fmt] for fmt in formats}
            s, first, diff, log = bench_one(
                name, model, tv, b, sz, arts, runtimes, rounds, block_s, args.threads
            )
            if log:
                xnn = "XNNPACK" in log
                print(f"LiteRT log: {log.strip()!r} -> XNNPACK delegate {'applied' if xnn else 'NOT seen'}")
            print(f"\n{name}, batch {b}, {sz}x{sz}")
            print(header)
            for rt in runtimes:
                fmt = "tflite" if rt.startswith("litert") else "onnx" if rt == "onnxruntime" else None
                exp = f"{export_s[str(arts[fmt])]:.1f}" if fmt else "-"
                print(
                    f"  {RUNTIMES[rt]:<22} {b / s[rt]:>9.1f} {1e3 * s[rt]:>9.2f} {s['jax'] / s[rt]:>6.2f}x "
                    f"{first[rt]:>13.1f} {exp:>9} {diff[rt]:>16.1e}",
                    flush=True,
                )
            summary.append((name, b, sz, s))
    print("\nimg/s (x the JAX row), medians:")
    print("| model | batch | size | " + " | ".join(RUNTIMES[rt] for rt in runtimes) + " |")
    print("|---|---|---|" + "---|" * len(runtimes))
    for name, b, sz, s in summary:
        cells = [f"{b / s[rt]:.1f} ({s['jax'] / s[rt]:.2f}x)" for rt in runtimes]
        print(f"| {name} | {b} | {sz} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
