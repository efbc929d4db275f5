"""Where the time of a whole `sanity run` goes, and how the core scales.

1. The CLI: ``sanity run`` (the default check: cascade, the paper's methods, the CNN on
   digits; the model from the cache, trained first if it is not there) for each of
   ``--images``, in a fresh process. Its wall time is split into explaining and
   comparing (``timing_s`` in run.json), the summary and figures (``finish`` timed
   again on the finished run), start-up (importing the package in a fresh process),
   and the rest (configuration, loading data and model, targets, randomizing, writing).
2. Scaling of the core (randomize, explain, compare; as scripts/bench_vs_quantus.py's
   sanity side) on random 1 x 28 x 28 images: time against images (``--scale-images``)
   and against states (``--scale-states``), and the peak memory (resident set, each
   point in a fresh process) against images and ``max_batch``.
3. Memory of a whole run: ``sanity_cli.check`` (the pipeline of ``sanity run``: randomize,
   explain, score, write the tables, verdicts and figures) on the same images, each
   point in a fresh process, against images (``--scale-images``) and ``image_chunk``
   (``--chunks``; 0: all images at once): the peak of the whole run, and the peak
   before the tables are read back for the summary, verdicts and report. glibc's
   malloc raises its mmap threshold as large blocks are freed, after which freed
   temporaries stay in the heap; the resident set then creeps up by some MiB per chunk.
   ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment fixes the threshold and shows
   what the run itself holds.

    python scripts/bench_pipeline.py

Writes ``--out`` (JSON) and prints a table of each part; ``--parts scaling`` (or
``cli``) reruns one part and keeps the other's results from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BLOCKS_FORWARD = ["conv1", "conv2", "fc1", "fc2"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wall(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def cli_run(images: int, cache_dir: str, scratch: Path) -> dict:
    """One ``sanity run`` in a fresh process: its wall time and where it went (seconds)."""
    env = {**os.environ, "SANITY_CACHE_DIR": cache_dir}
    run_dir = scratch / f"run_{images}"
    sanity = [sys.executable, "-m", "sanity_cli.cli", "run", f"n_images={images}", "device=cpu",
              f"hydra.run.dir={run_dir}"]
    wall = _wall(sanity, env)
    from sanity_cli.runfiles import read_info

    timing = read_info(run_dir)["timing_s"]
    startup = _wall([sys.executable, "-c", "import sanity_cli.cli, sanity_cli.pipeline, sanity_cli.figures"], env)
    finish = _wall([sys.executable, "-c", f"from sanity_cli.pipeline import finish; finish(__import__('pathlib')"
                                          f".Path({str(run_dir)!r}))"], env) - startup
    parts = {"explain": timing["explain"], "compare": timing["compare"], "summary and figures": finish,
             "start-up (imports)": startup}
    parts["rest (config, data, model, targets, randomizing, writing)"] = wall - sum(parts.values())
    return {"images": images, "wall_s": wall, "parts_s": parts,
            "shares": {part: seconds / wall for part, seconds in parts.items()}}


def _random_digits(images: int):
    """The benchmark's CNN (bench_vs_quantus.paper_cnn, seeded) and ``images`` random
    1 x 28 x 28 inputs with random classes."""
    sys.path.insert(0, str(HERE))
    import torch

    from bench_vs_quantus import paper_cnn

    torch.manual_seed(0)
    return paper_cnn(), torch.rand(images, 1, 28, 28), torch.randint(0, 10, (images,))


def _peak_mib() -> float:
    """The process's peak resident memory so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scaling_point(images: int, blocks: list[str], max_batch: int, steps: int, samples: int, queue) -> None:
    """One point of the scaling curves, in its own process: wall and CPU seconds of the
    core on ``images`` random images, and its peak resident memory above the set-up's."""
    model, x, y = _random_digits(images)
    from bench_vs_quantus import SET, sanity_cascade, sanity_methods

    before = _peak_mib()
    wall, cpu = time.perf_counter(), time.process_time()
    sanity_cascade(model, x, y, sanity_methods(SET, steps, samples), max_batch, blocks=blocks)
    queue.put({"images": images, "states": len(blocks) + 1, "max_batch": max_batch,
               "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
               "peak_rss_mib": _peak_mib(), "peak_above_setup_mib": _peak_mib() - before})


def memory_point(images: int, chunk: int, max_batch: int, steps: int, samples: int, queue) -> None:
    """One point of the memory table, in its own process: a whole run through the API on
    ``images`` random images with ``image_chunk=chunk`` (0: all at once), its wall time and
    its peak resident memory above the set-up's."""
    os.environ["SANITY_PROGRESS"] = "0"
    model, x, y = _random_digits(images)
    from bench_vs_quantus import SET, sanity_methods
    from sanity_cli import check, pipeline

    methods = sanity_methods(SET, steps, samples)
    options = {f"method.{name}.{key}": value for name, given in methods.items() for key, value in given.items()
               if key in ("steps", "samples", "noise")}
    finish, states_peak = pipeline.finish, []

    def finish_after_the_states(*args, **kwargs):  # the peak of the states, before the tables are read back
        states_peak.append(_peak_mib())
        return finish(*args, **kwargs)

    pipeline.finish = finish_after_the_states
    before = _peak_mib()
    wall = time.perf_counter()
    try:
        check(model, x, list(methods), "cascade", labels=y, max_batch=max_batch, image_chunk=chunk or None,
              device="cpu", **{"metrics.names": ["spearman_abs"], "n_examples": 1, **options})
    finally:
        pipeline.finish = finish
    queue.put({"images": images, "image_chunk": chunk, "max_batch": max_batch,
               "wall_s": time.perf_counter() - wall,
               "peak_rss_mib": _peak_mib(), "peak_above_setup_mib": _peak_mib() - before,
               "states_peak_above_setup_mib": states_peak[0] - before,
               "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")})


def in_fresh_process(*args, point=scaling_point) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=point, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def scaling(args: argparse.Namespace) -> list[dict]:
    """Points over images (all blocks), over states (the first images), over max_batch."""
    first = args.scale_images[0]
    points = [(images, BLOCKS_FORWARD, args.max_batch) for images in args.scale_images]
    points += [(first, BLOCKS_FORWARD[-(states - 1):], args.max_batch) for states in args.scale_states
               if states != len(BLOCKS_FORWARD) + 1]
    points += [(args.scale_images[-1], BLOCKS_FORWARD, batch) for batch in args.scale_batches
               if batch != args.max_batch]
    results = []
    for images, blocks, batch in points:
        results.append(in_fresh_process(images, blocks, batch, args.steps, args.samples))
        log(f"scaling: {results[-1]}")
    return results


def memory(args: argparse.Namespace) -> list[dict]:
    """Whole runs over images, with each image_chunk."""
    results = []
    for images in args.scale_images:
        for chunk in args.chunks:
            results.append(in_fresh_process(images, chunk, args.max_batch, args.steps, args.samples,
                                            point=memory_point))
            log(f"memory: {results[-1]}")
    return results


def print_tables(result: dict) -> None:
    for run in result.get("cli", []):
        print(f"sanity run n_images={run['images']}: {run['wall_s']:.1f} s")
        for part, seconds in run["parts_s"].items():
            print(f"  {part:<60}{seconds:>8.2f} s {100 * run['shares'][part]:>6.1f} %")
    print(f"{'images':>8}{'states':>8}{'max_batch':>11}{'wall s':>9}{'CPU s':>9}{'CPU s / image-state':>22}"
          f"{'peak MiB':>10}{'above set-up':>14}")
    for p in result.get("scaling", []):
        per = p["cpu_s"] / (p["images"] * p["states"])
        print(f"{p['images']:>8}{p['states']:>8}{p['max_batch']:>11}{p['wall_s']:>9.2f}{p['cpu_s']:>9.2f}"
              f"{1e3 * per:>19.2f} ms{p['peak_rss_mib']:>10.0f}{p['peak_above_setup_mib']:>14.0f}")
    print(f"whole runs (sanity_cli.check)\n{'images':>8}{'image_chunk':>13}{'wall s':>9}{'peak MiB':>10}"
          f"{'above set-up':>14}{'of it in the states':>21}{'mmap threshold':>16}")
    for p in result.get("memory", []):
        print(f"{p['images']:>8}{p['image_chunk'] or 'all':>13}{p['wall_s']:>9.2f}{p['peak_rss_mib']:>10.0f}"
              f"{p['peak_above_setup_mib']:>14.0f}{p['states_peak_above_setup_mib']:>21.0f}"
              f"{p.get('malloc_mmap_threshold') or 'glibc default':>16}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=ints, default=[32, 200], help="n_images of the timed `sanity run`s")
    parser.add_argument("--cache-dir", default=os.environ.get("SANITY_CACHE_DIR", "~/.cache/sanity/models"))
    parser.add_argument("--scale-images", type=ints, default=[200, 2000])
    parser.add_argument("--scale-states", type=ints, default=[2, 3, 5])
    parser.add_argument("--scale-batches", type=ints, default=[64, 256], help="max_batch at the most images")
    parser.add_argument("--max-batch", type=int, default=64, help="max_batch of the scaling points")
    parser.add_argument("--steps", type=int, default=5, help="IG steps in the scaling points")
    parser.add_argument("--samples", type=int, default=5, help="SmoothGrad samples in the scaling points")
    parser.add_argument("--chunks", type=ints, default=[0, 256], help="image_chunk of the whole runs (0: all)")
    parser.add_argument("--parts", type=lambda t: t.split(","), default=["cli", "scaling", "memory"],
                        help="cli, scaling, memory, or several; a part not run keeps its results from --out")
    parser.add_argument("--out", type=Path, default=HERE / "bench_pipeline.json")
    args = parser.parse_args(argv)
    if set(args.parts) - {"cli", "scaling", "memory"}:
        parser.error(f"--parts takes cli, scaling and memory, not {args.parts}")
    return args


def cli_runs(args: argparse.Namespace) -> list[dict]:
    env = {**os.environ, "SANITY_CACHE_DIR": args.cache_dir}
    with tempfile.TemporaryDirectory(prefix="sanity-bench-") as scratch:
        _wall([sys.executable, "-m", "sanity_cli.cli", "run", "n_images=2", "device=cpu",  # the model into the cache
               f"hydra.run.dir={Path(scratch) / 'warm-up'}"], env)
        return [cli_run(images, args.cache_dir, Path(scratch)) for images in args.images]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.setdefault("machine", {})[f"load_average_{'_'.join(args.parts)}"] = os.getloadavg()
    result["machine"]["threads"] = os.environ.get("OMP_NUM_THREADS")
    result.setdefault("settings", {}).update({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    if "cli" in args.parts:
        result["cli"] = cli_runs(args)
    if "scaling" in args.parts:
        result["scaling"] = scaling(args)
    if "memory" in args.parts:  # points under another malloc setting are kept beside these
        threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        kept = [p for p in result.get("memory", []) if p.get("malloc_mmap_threshold") != threshold]
        result["memory"] = kept + memory(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_tables(result)


if __name__ == "__main__":
    main()
