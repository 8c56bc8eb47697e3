"""``python -m benchmarks``: run the suite, print a table, write ``benchmarks/results/<machine>.json``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
from pathlib import Path

from . import extraction, generation, hardware, selection
from .models import RANDOM_PREFIX, SHAPES, resolve

RESULTS = Path(__file__).parent / "results"


def machine_name() -> str:
    """A stable label for this machine: accelerator name if any, else CPU architecture and core count."""
    import torch

    if torch.cuda.is_available():
        label = torch.cuda.get_device_name(0)
    else:
        label = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-").lower()


def generation_devices(device: str) -> list[str]:
    """The generation benchmark runs on the CPU always, and also on the GPU where there is one (or was asked)."""
    import torch

    devices = ["cpu"]
    if device != "cpu":
        devices.append(device)
    elif torch.cuda.is_available():
        devices.append("cuda")
    return devices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    random_specs = ", ".join(RANDOM_PREFIX + shape for shape in SHAPES)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help=f"model for the scaling, generation and hardware benchmarks: an offline name, a path, "
                             f"or a random model of a real shape ({random_specs})")
    parser.add_argument("--extraction-models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"],
                        help="models for the extraction benchmark (default: a 49k and a 262k vocabulary)")
    parser.add_argument("--selection-model", default="smollm2-135m-refusal")
    parser.add_argument("--device", default="cpu", help="cpu or cuda; on cuda models default to bfloat16")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, "
                                                       "bfloat16 on a GPU)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory for random models "
                                                          "(default: SmolLM2's, from the offline model cache)")
    parser.add_argument("--n-prompts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed extraction runs per method (best counts)")
    suites = ["extraction", "scaling", "selection", "generation", "hardware"]
    parser.add_argument("--suite", nargs="+", choices=suites, default=suites)
    parser.add_argument("--scaling-prompts", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--scaling-words", type=int, nargs="+", default=[8, 32, 96, 224],
                        help="filler words per prompt for the sequence-length scan (64 prompts)")
    parser.add_argument("--selection-val", type=int, default=16, help="val prompts per side in the selection benchmark")
    parser.add_argument("--selection-kl-max", type=float, nargs="+", default=[0.1, 1.0],
                        help="KL filters to run the selection benchmark with (0.1 is the paper's)")
    parser.add_argument("--selection-induce-min", type=float, default=0.0,
                        help="induce filter (the paper's 0); a random model induces nothing, so -inf there makes "
                             "every candidate a contender, as in a refusing model")
    parser.add_argument("--generation-batch-sizes", type=int, nargs="+", default=[16],
                        help="batch sizes for the generation benchmark (2 batches of prompts each)")
    parser.add_argument("--generation-repeats", type=int, default=3,
                        help="timed generation runs per engine, interleaved (best counts)")
    args = parser.parse_args(argv)
    from refusal_lens.manifest import versions
    from refusal_lens.models import cache_dir

    workdir = cache_dir() / "benchmarks"
    args.model, args.selection_model = (
        resolve(spec, workdir, args.tokenizer) for spec in (args.model, args.selection_model)
    )
    args.extraction_models = [resolve(spec, workdir, args.tokenizer) for spec in args.extraction_models]

    device = dict(device=args.device, dtype=args.dtype)
    out = RESULTS / f"{machine_name()}.json"
    record = json.loads(out.read_text()) if out.exists() else {}
    record.update({"created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                   "machine": machine_name(), "versions": versions()})
    if "extraction" in args.suite:
        record["extraction"] = _extraction(args, device)
    if "scaling" in args.suite:
        record["scaling"] = _scaling(args, device)
    if "generation" in args.suite:
        record["generation"] = _generation(args)
    if "hardware" in args.suite:
        result = hardware.forward_flops(args.model, n_prompts=2 * args.batch_size, batch_size=args.batch_size, **device)
        print(f"hardware: forward {result['achieved_gflops']:.1f} GFLOP/s vs matmul {result['matmul_peak_gflops']:.1f} "
              f"GFLOP/s = {result['fraction_of_peak']:.1%} of peak ({result['threads']} threads)")
        record["hardware"] = result
    if "selection" in args.suite:
        record["selection"] = []
        for kl_max in args.selection_kl_max:
            result = selection.compare(args.selection_model, n_val=args.selection_val, kl_max=kl_max,
                                       induce_min=args.selection_induce_min, **device)
            scores = ", ".join(f"{n} {k}" for k, n in result["scores_by_ours"].items())
            print(
                f"selection (KL <= {kl_max}, induce >= {args.selection_induce_min}): "
                f"ours {result['ours_seconds']:.0f} s vs reference "
                f"{result['reference_seconds']:.0f} s = {result['speed_ratio']:.2f}x; same pick: {result['same_pick']} "
                f"({result['ours_best']}); ours computed {scores} of {result['candidates']} each"
            )
            record["selection"].append(result)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _extraction(args, device: dict) -> list[dict]:
    rows = [extraction.compare(model, n, args.batch_size, with_unsorted=True, repeats=args.repeats, **device)
            for model in args.extraction_models for n in args.n_prompts]
    print(f"{'model':<24} {'prompts':>8} {'stream p/s':>11} {'unsorted p/s':>13} {'naive p/s':>10} {'speed x':>8} "
          f"{'unsorted x':>11} {'stream MB':>10} {'naive MB':>9} {'mem ratio':>10} {'same mean':>10}")
    for r in rows:
        print(f"{Path(r['model']).name:<24} {r['n_prompts']:>8} {r['streaming']['prompts_per_s']:>11.1f} "
              f"{r['streaming_unsorted']['prompts_per_s']:>13.1f} {r['naive']['prompts_per_s']:>10.1f} "
              f"{r['throughput_ratio']:>8.2f} {r['unsorted_throughput_ratio']:>11.2f} "
              f"{r['streaming']['extra_mb']:>10.0f} {r['naive']['extra_mb']:>9.0f} "
              f"{r['extra_memory_ratio']:>10.3f} {str(r['same_mean']):>10}")
    return rows


def _generation(args) -> list[dict]:
    """Plain HF vs the bridge and torch engines, per device of :func:`generation_devices` and batch size."""
    rows = []
    for device in generation_devices(args.device):
        dtype = args.dtype if device == args.device else None  # the other device: its own default
        for batch_size in args.generation_batch_sizes:
            result = generation.compare(args.model, batch_size=batch_size, n_prompts=2 * batch_size, device=device,
                                        dtype=dtype, repeats=args.generation_repeats)
            print(generation.summary(result))
            rows.append(result)
    return rows


def _scaling(args, device: dict) -> dict:
    """Streaming vs naive time and memory against the number of prompts and against prompt length."""
    by_prompts = [extraction.compare(args.model, n, args.batch_size, **device) for n in args.scaling_prompts]
    by_length = [extraction.compare(args.model, 64, args.batch_size, words=w, **device) for w in args.scaling_words]
    print(f"{'scan':>8} {'value':>6} {'tokens':>7} {'stream s':>9} {'naive s':>8} {'stream MB':>10} {'naive MB':>9}")
    for scan, rows, key in (("prompts", by_prompts, "n_prompts"), ("words", by_length, "words")):
        for r in rows:
            print(f"{scan:>8} {r[key]:>6} {r['streaming']['n_tokens']:>7} {r['streaming']['seconds']:>9.1f} "
                  f"{r['naive']['seconds']:>8.1f} {r['streaming']['extra_mb']:>10.0f} {r['naive']['extra_mb']:>9.0f}")
    return {"by_prompts": by_prompts, "by_length": by_length}


if __name__ == "__main__":
    raise SystemExit(main())
