"""The benchmark scripts: sanity and Quantus do the same work and agree on it; the
floor counts the passes the work needs; the outputs hold what the README quotes."""

from __future__ import annotations

import json
import queue
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_pipeline  # noqa: E402
import bench_reuse  # noqa: E402
import bench_sustained  # noqa: E402
import bench_vs_quantus as bench  # noqa: E402

pytest.importorskip("captum", reason="the Quantus benchmark wraps Captum: pip install captum")
pytest.importorskip("quantus", reason="the Quantus benchmark needs it: pip install quantus")


def test_passes_per_image_count_shared_passes_once():
    assert bench.passes_per_image("gradient", 50, 50) == 1
    assert bench.passes_per_image("integrated_gradients", 50, 30) == 50
    assert bench.passes_per_image("smoothgrad", 50, 30) == 30
    # gradient, input_x_gradient and gradcam share one pass; IG and SmoothGrad add theirs
    assert bench.passes_per_image(bench.SET, 50, 30) == 81


def test_both_tools_randomize_the_same_blocks_in_the_same_order():
    model = bench.paper_cnn()
    x, _ = bench.digits(2)
    bench.check_same_blocks(model, x)  # raises SystemExit when they differ
    names = [name for name, _ in bench.quantus_states(model)]
    assert names == ["original", *bench.BLOCKS_TOP_DOWN]


@pytest.mark.parametrize("item", ["gradient", "input_x_gradient", "integrated_gradients", "gradcam"])
def test_sanity_scores_equal_quantus_scores_on_the_same_states(item):
    args = bench.parse_args(["--images", "6", "--steps", "3"])
    tools = bench.Bench(args)
    quantus_scores = tools.quantus(item, batch=3)
    result = tools.agreement(item, quantus_scores, batch=4)
    assert result["n_scores"] > 0
    # The same maps up to float rounding (batches of 3 and 4), which can swap near-equal ranks.
    assert result["max_abs_difference"] < 1e-4
    assert result["correlation"] > 0.99999
    on_states = bench.sanity_on_states(bench.quantus_states(tools.model), tools.x, tools.y,
                                       bench.sanity_methods(item, 3, 50), 4)[item]
    for block in bench.BLOCKS_TOP_DOWN:  # undefined (constant GradCAM maps) in both or neither
        np.testing.assert_array_equal(np.isnan(quantus_scores[block]), np.isnan(on_states[block]))


def test_quantus_spearman_scores_a_batch_of_constant_maps_per_image():
    import scipy.stats

    generator = np.random.default_rng(0)
    a, b = generator.random((3, 20)), generator.random((3, 20))
    a[0] = b[0] = 0.0  # constant on both sides: scipy gives up on the whole batch
    scores = bench.quantus_spearman(a, b, batched=True)
    assert np.isnan(scores[0])
    np.testing.assert_allclose(scores[1:], [scipy.stats.spearmanr(a[i], b[i])[0] for i in (1, 2)])
    c = generator.random((3, 20))
    np.testing.assert_allclose(bench.quantus_spearman(a[1:], c[1:], batched=True),
                               [scipy.stats.spearmanr(a[i], c[i])[0] for i in (1, 2)])


def test_sanity_cascade_times_its_parts_and_restores_the_model():
    model = bench.paper_cnn()
    trained = {name: value.clone() for name, value in model.state_dict().items()}
    x, y = bench.digits(4)
    parts: dict[str, float] = {}
    scores = bench.sanity_cascade(model, x, y, bench.sanity_methods("gradient", 2, 2), 4, parts)
    assert list(scores["gradient"]) == bench.BLOCKS_TOP_DOWN
    assert all(len(values) == 4 for values in scores["gradient"].values())
    assert set(parts) == {"randomize", "explain", "compare"} and all(v > 0 for v in parts.values())
    assert all(torch.equal(value, trained[name]) for name, value in model.state_dict().items())


def test_the_benchmark_writes_its_table_and_ends_with_the_summary_line(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--images", "3", "--reps", "2", "--steps", "2", "--samples", "2", "--sanity-batches", "4",
                "--quantus-batches", "3", "--floor-batches", "4", "--floor-samples", "16", "--out", str(out),
                "--min-seconds", "1e9", "--max-runs", "2"])
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out.read_text())
    rows = {row["item"]: row for row in result["rows"]}
    assert list(rows) == [*bench.ITEMS, bench.SET]
    everything = rows[bench.SET]
    assert everything["passes"] == (1 + 2 + 2) * 3 * 5
    # Quantus's set is its five MPRT calls: the sum of its items, repetition by repetition
    sums = [sum(result["times_s"]["quantus"][item][rep]["wall"] for item in bench.ITEMS) for rep in range(2)]
    assert everything["quantus_min_s"] == pytest.approx(min(sums))
    assert everything["speed_up"] == pytest.approx(everything["quantus_min_s"] / everything["sanity_min_s"])
    # each repetition ran every item twice per tool (--max-runs) and kept the faster run
    for tool in ("sanity", "quantus"):
        every, kept = result["every_run_s"][tool]["gradient"], result["times_s"][tool]["gradient"]
        assert len(every) == 4 and len(kept) == 2
        assert [t["wall"] for t in kept] == [min(every[0]["wall"], every[1]["wall"]),
                                             min(every[2]["wall"], every[3]["wall"])]
    # the floor is the least time of one pass among all its measurements: at the start and
    # before each repetition
    measured = [result["floor_at_start"]["wall"][1]] + [f["wall"][1] for fs in result["floors"].values() for f in fs]
    assert len(measured) == 1 + 2 * len(rows) and result["floor"]["wall"][1] == min(measured)
    assert everything["floor_s"] == pytest.approx(everything["passes"] * min(measured))
    assert everything["sanity_of_floor"] == pytest.approx(everything["floor_s"] / everything["sanity_min_s"])
    assert rows["gradient"]["agreement"] == pytest.approx(1.0)
    assert printed[-1] == (f"speed-up over quantus: {everything['speed_up']:.1f}x; "
                           f"sanity at {everything['sanity_of_floor']:.2f} of the floor")
    assert out.with_suffix(".csv").read_text().splitlines()[0].startswith("item,passes,floor_s")


def test_with_batch_auto_sanity_takes_the_batch_its_measurement_picks(tmp_path, monkeypatch):
    curve = {8: 4.0, 16: 2.0, 32: 1.0, 64: 1.02, 128: 1.5}
    monkeypatch.setattr(bench.batching, "pass_time", lambda model, example, batch: curve[batch])
    out = tmp_path / "bench.json"
    bench.main(["--images", "3", "--reps", "1", "--steps", "2", "--samples", "2", "--items", "gradient",
                "--sanity-max-batch", "128", "--quantus-batches", "3", "--floor-batches", "4",
                "--floor-samples", "16", "--out", str(out), "--min-seconds", "0", "--max-runs", "1"])
    result = json.loads(out.read_text())
    assert result["sanity_auto_batch"]["batch"] == 32  # 64 is within 5% of 32's time, and bigger
    assert result["rows"][0]["sanity_batch"] == 32 and result["tuning"]["sanity"]["gradient"][0] == 32


def test_a_scaling_point_counts_its_states_and_memory():
    results: queue.Queue = queue.Queue()
    bench_pipeline.scaling_point(4, ["fc1", "fc2"], 8, 2, 1, results)
    point = results.get_nowait()
    assert (point["images"], point["states"], point["max_batch"]) == (4, 3, 8)
    assert point["cpu_s"] > 0 and point["peak_rss_mib"] >= point["peak_above_setup_mib"] >= 0


def test_a_memory_point_runs_the_whole_check_in_chunks():
    results: queue.Queue = queue.Queue()
    bench_pipeline.memory_point(5, 2, 8, 2, 1, results)
    point = results.get_nowait()
    assert (point["images"], point["image_chunk"], point["max_batch"]) == (5, 2, 8)
    assert point["wall_s"] > 0 and point["peak_rss_mib"] >= point["peak_above_setup_mib"] >= 0
    assert point["peak_above_setup_mib"] >= point["states_peak_above_setup_mib"] >= 0


def test_the_reuse_benchmark_finds_the_same_maps_and_counts_its_passes(tmp_path):
    out = tmp_path / "reuse.json"
    rows = bench_reuse.main(["--images", "4", "--resnet-images", "2", "--resnet-size", "32", "--steps", "2",
                             "--reps", "1", "--max-batch", "4", "--out", str(out)])
    assert [(row["model"], row["method"]) for row in rows] == [
        (model, method) for model in ("cnn", "resnet18") for method in ("gradient", "integrated_gradients")]
    for row in rows:
        assert row["max_abs_difference"] <= 1e-6
        passes_per_state = row["passes"] // row["states"]
        assert passes_per_state == (2 if row["method"] == "integrated_gradients" else 1) * row["images"]
        # every forward of step 0 is kept and used again in each state that leaves a block trained
        forwards = -(-passes_per_state // row["max_batch"])
        assert row["passes_kept"] == forwards and row["passes_reused"] == forwards * (row["states"] - 2)
        assert row["reuse_of_floor"] == pytest.approx(row["floor_s"] / row["reuse_s"])
    assert json.loads(out.read_text())["rows"][0]["model"] == "cnn"


def test_the_sustained_benchmark_times_the_passes_sanity_needs(tmp_path, capsys):
    model = bench.paper_cnn()
    x, y = bench.digits(5)
    batches = []
    handle = model.register_forward_hook(lambda module, args, out: batches.append(len(args[0])))
    try:
        bench_sustained.plain_passes(model, x, y, passes=3, batch=4)
    finally:
        handle.remove()
    assert batches == [4, 4, 4, 3]  # 3 passes of 5 images, at most 4 at a time
    out = tmp_path / "sustained.json"
    bench_sustained.main(["--images", "3", "--reps", "2", "--steps", "2", "--samples", "3", "--max-batch", "4",
                          "--min-seconds", "0", "--floor-samples", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {row["item"]: row for row in result["rows"]}
    assert {item: row["passes"] for item, row in rows.items()} == {
        "gradient": 3, "integrated_gradients": 6, "smoothgrad": 9}
    floor = min(result["burst_floor_per_pass_s"])
    for item, row in rows.items():
        times = result["times_s"][item]
        assert len(times["sanity"]) == len(times["plain"]) == 2
        assert row["sanity_of_plain"] == pytest.approx(min(times["plain"]) / min(times["sanity"]))
        assert row["burst_floor_s"] == pytest.approx(floor * row["passes"])
        assert row["sanity_of_burst_floor"] == pytest.approx(row["burst_floor_s"] / row["sanity_min_s"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("smoothgrad")


def test_the_224_pixel_benchmark_runs_both_tools_on_the_same_cascade(tmp_path, capsys):
    import bench_224

    out = tmp_path / "bench_224.json"
    result = bench_224.main(["--images", "2", "--size", "16", "--samples", "2", "--classes", "5", "--device", "cpu",
                             "--floor-batches", "2", "--auto-limit", "8", "--quantus-batch", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    model = bench_224.resnet18(5, torch.device("cpu"))
    assert result["modules"] == len(bench_224.quantus_order(model)) == 41  # 20 conv, 20 batch norm, fc
    rows = {(row["item"], row["tool"]): row for row in result["rows"]}
    assert set(rows) == {(item, tool) for item in bench_224.ITEMS for tool in ("sanity", "quantus")}
    for (item, _tool), row in rows.items():
        assert row["states"] == 41  # both tools scored every randomized state
        assert row["passes"] == 2 * 42 * (2 if item == "smprt" else 1)
        assert row["floor_s"] == pytest.approx(row["passes"] * result["floor"]["seconds_per_pass"])
        assert row["of_floor"] == pytest.approx(row["floor_s"] / row["seconds"])
        assert row["images_per_s"] == pytest.approx(2 / row["seconds"])
        assert row["peak_mib"] > 0
    assert 0 < rows[("mprt", "sanity")]["compare_share"] and rows[("mprt", "sanity")]["batch"] in (2, 8)
    assert "mprt: sanity" in capsys.readouterr().out


def test_peak_memory_counts_what_a_block_holds_at_its_height():
    import bench_224

    with bench_224.PeakMemory(torch.device("cpu")) as memory:
        held = torch.ones(16 * 2**20 // 4)  # 16 MiB
        time.sleep(3 * bench_224.SAMPLE_EVERY)  # held across samples
        del held
    assert 15 * 2**20 < memory.peak < 24 * 2**20
