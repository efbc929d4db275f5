"""test=manifold: tangent spaces, the share of a map in them, and the check end to end.

Closed forms first (a linear subspace, whose tangent space is itself; a random direction's
share, whose square is Beta(k/2, (d-k)/2) distributed), then a manifold known exactly
(the decoded dataset, whose decoder and latent points are known), then runs.
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from sanity_cli import cli, manifold
from sanity_cli.checks import manifold as check
from small_runs import Runs


def beta_of(k: int, d: int):
    """The distribution of a uniformly random direction's squared share in a k-dim subspace of R^d."""
    return scipy.stats.beta(k / 2, (d - k) / 2)


# ---------------------------------------------------------------- a linear subspace


@pytest.mark.parametrize(("d", "k", "seed"), [(300, 12, 0), (144, 4, 7)])
def test_a_random_direction_keeps_sqrt_k_over_d(d, k, seed):
    n = 4000
    basis = manifold.subspace_basis(d, k, seed).expand(n, d, k)
    vectors = torch.randn(n, 1, d, 1, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    fractions = manifold.tangent_fraction(basis, vectors, channels=1).numpy()
    law = beta_of(k, d)
    # the mean square is k/d exactly; the sampling error is the Beta law's, over n draws
    assert abs((fractions**2).mean() - k / d) < 4 * law.std() / math.sqrt(n)
    assert math.sqrt((fractions**2).mean()) == pytest.approx(manifold.random_fraction(k, d), rel=0.03)
    # and the mean share is the Beta law's E[sqrt], a little below sqrt(k/d)
    expected = law.expect(np.sqrt)
    spread = math.sqrt(law.expect(lambda v: v) - expected**2)
    assert abs(fractions.mean() - expected) < 4 * spread / math.sqrt(n)


@pytest.mark.parametrize("seed", [0, 5])
def test_inside_the_subspace_is_1_and_orthogonal_to_it_0(seed):
    d, k = 64, 5
    basis = manifold.subspace_basis(d, k, seed)
    generator = torch.Generator().manual_seed(seed)
    inside = basis @ torch.randn(k, generator=generator, dtype=torch.float64)
    other = torch.randn(d, generator=generator, dtype=torch.float64)
    orthogonal = other - basis @ (basis.T @ other)
    maps = torch.stack([inside, orthogonal]).view(2, 1, 8, 8)
    fractions = manifold.tangent_fraction(basis.expand(2, d, k), maps, channels=1)
    torch.testing.assert_close(fractions, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_a_zero_map_has_no_share():
    basis = manifold.subspace_basis(16, 2).expand(1, 16, 2)
    assert torch.isnan(manifold.tangent_fraction(basis, torch.zeros(1, 1, 4, 4), channels=1)).all()


def test_grey_manifold_under_rgb_maps_projects_the_channel_sum():
    """A grey manifold repeated in three channels: its tangent vectors are t (x) 1_3."""
    d, k = 36, 3
    basis = manifold.subspace_basis(d, k, seed=2)
    generator = torch.Generator().manual_seed(2)
    grey = (basis @ torch.randn(k, generator=generator, dtype=torch.float64)).view(1, 1, 6, 6)
    repeated = grey.expand(1, 3, 6, 6)
    cancelling = torch.randn(1, 1, 6, 6, generator=generator, dtype=torch.float64) * torch.tensor(
        [1.0, -2.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)  # every pixel's channels sum to 0
    maps = torch.cat([repeated, cancelling])
    fractions = manifold.tangent_fraction(basis.expand(2, d, k), maps, channels=1)
    torch.testing.assert_close(fractions, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    # a random RGB direction keeps sqrt(k / 3d): the manifold's tangent space lies in R^(3d)
    n = 3000
    noise = torch.randn(n, 3, 6, 6, generator=generator, dtype=torch.float64)
    shares = manifold.tangent_fraction(basis.expand(n, d, k), noise, channels=1)
    law = beta_of(k, 3 * d)
    assert abs((shares**2).mean().item() - k / (3 * d)) < 4 * law.std() / math.sqrt(n)


@pytest.mark.parametrize(("manifold_channels", "map_channels"), [(1, 1), (1, 3), (3, 3), (3, 1)])
def test_projection_and_rest_split_each_map(manifold_channels, map_channels):
    """The projection's length is the share, and the rest is orthogonal to the tangent space,
    in every pairing of grey and colour."""
    d, k, n = manifold_channels * 25, 4, 6
    basis = manifold.subspace_basis(d, k, seed=1).expand(n, d, k)
    maps = torch.randn(n, map_channels, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    maps = maps / maps.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    inside = manifold.projected_maps(basis, maps, manifold_channels)
    assert inside.shape == maps.shape
    torch.testing.assert_close(inside.flatten(1).norm(dim=1), manifold.tangent_fraction(basis, maps, manifold_channels))
    rest = (maps - inside).flatten(1)  # orthogonal to every tangent direction a map of its channels has
    directions = manifold.in_map_pixels(basis, map_channels, manifold_channels)
    assert torch.einsum("bdk,bd->bk", directions, rest).abs().max() < 1e-12
    torch.testing.assert_close(directions.transpose(1, 2) @ directions,
                               torch.eye(k, dtype=torch.float64).expand(n, k, k))


# ---------------------------------------------------------------- a manifold known exactly


def exact_jacobian(decoder: manifold.ExactDecoder, z: torch.Tensor) -> np.ndarray:
    """The decoder's Jacobian (d, k) at one point, by reverse-mode autograd, one output at a time."""
    return torch.autograd.functional.jacobian(lambda v: decoder.decode(v[None]).flatten(), z).numpy()


def test_tangent_basis_spans_the_decoders_jacobian():
    decoder = manifold.exact_decoder()
    z = manifold.decoded_points(5, "test")
    basis = manifold.tangent_basis(decoder.decode, z)
    assert basis.shape == (5, 144, manifold.DECODED_LATENT)
    torch.testing.assert_close(basis.transpose(1, 2) @ basis, torch.eye(4, dtype=torch.float64).expand(5, 4, 4))
    for i in range(5):
        angles = scipy.linalg.subspace_angles(basis[i].numpy(), exact_jacobian(decoder, z[i]))
        assert angles.max() < 1e-5


@pytest.mark.parametrize(("mean", "std"), [((0.0,), (1.0,)), ((0.5,), (0.25,))])
def test_the_checks_manifold_finds_the_exact_tangent_space_of_the_decoded_images(mean, std):
    """Through the model's normalization and the encoder: the images of the decoded dataset
    get the tangent spaces of their true latent points."""
    data = manifold.DecodedImages("test")
    images = data.images[:6]
    inputs = (images - mean[0]) / std[0]
    found = manifold.Manifold(manifold.exact_decoder(), mean, std).basis(inputs)
    decoder = manifold.exact_decoder()
    for i in range(6):
        angles = scipy.linalg.subspace_angles(found[i].numpy(), exact_jacobian(decoder, data.z[i]))
        assert angles.max() < 1e-5
    torch.testing.assert_close(manifold.Manifold(decoder, mean, std).reconstruction(inputs),
                               torch.ones(6, dtype=torch.float64))


def test_decoded_labels_follow_the_rule_on_z():
    data = manifold.DecodedImages("train")
    assert len(data) == 2000 and data.images.shape == (2000, 1, 12, 12)
    assert data.images.min() >= 0 and data.images.max() <= 1
    z0, z1 = data.z[:, 0] > 0, data.z[:, 1] > 0
    assert torch.equal(data.targets, z0.long() * 2 + z1.long())
    assert set(data.targets.tolist()) == {0, 1, 2, 3}


def test_a_user_decoder_loads_its_checkpoint(tmp_path):
    decoder = manifold.exact_decoder()
    state = decoder.state_dict()
    state["second"] = -state["second"]
    torch.save(state, tmp_path / "flipped.pt")
    z = manifold.decoded_points(3, "test")
    plain = manifold.user_autoencoder({"_target_": "sanity_cli.manifold.exact_decoder", "checkpoint": None}, 1)
    loaded = manifold.user_autoencoder({"_target_": "sanity_cli.manifold.exact_decoder",
                                        "checkpoint": str(tmp_path / "flipped.pt")}, 1)
    torch.testing.assert_close(plain.decode(z), decoder.decode(z))
    torch.testing.assert_close(loaded.decode(z), 1 - decoder.decode(z))  # sigmoid(-u) = 1 - sigmoid(u)


def test_a_user_decoder_without_encode_is_one_line():
    from sanity_cli.errors import SanityError

    with pytest.raises(SanityError, match="encode") as refused:
        manifold.user_autoencoder({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 2}, 1)
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------- the verdict rule


def decisive_rows(fractions: dict[str, list[float]], r2: float = 0.9, correct: bool = True):
    import pandas as pd

    rows = []
    for method, values in fractions.items():
        for image, value in enumerate(values):
            label = image % 10
            target = label if correct else (label + 1) % 10
            for metric, number in ((check.FRACTION, value), (check.RECONSTRUCTION, r2), (check.CHANCE, 0.1)):
                rows.append({"test": "manifold", "model": "cnn", "dataset": "digits", "method": method, "seed": 0,
                             "step": 1, "block": check.TANGENT, "image": image, "label": label, "target": target,
                             "metric": metric, "value": number})
    return pd.DataFrame(rows)


def judged(rows, **run_settings):
    from sanity_cli.judging import verdict_table

    return verdict_table(rows, controls={"random"}, run_settings=run_settings).set_index("method")


def test_aligned_not_aligned_and_inconclusive_against_the_random_control():
    generator = np.random.default_rng(0)
    random = list(0.10 + 0.01 * generator.standard_normal(40))
    table = judged(decisive_rows({"random": random, "high": list(0.5 + 0.01 * generator.standard_normal(40)),
                                  "low": list(0.10 + 0.01 * generator.standard_normal(40)),
                                  "near": list(0.16 + 0.05 * generator.standard_normal(40))}))
    threshold = table.loc["random", "ci_high"] + 0.05
    assert (table["threshold"] == threshold).all()
    assert table.loc["high", "verdict"] == "aligned" and table.loc["low", "verdict"] == "not aligned"
    assert table.loc["near", "verdict"] == "inconclusive"
    assert table.loc["random", "is_control"] and table.loc["random", "note"].startswith("control:")
    wider = judged(decisive_rows({"random": random, "high": [0.2] * 40}), test={"margin": 0.5})
    assert wider.loc["high", "verdict"] == "not aligned"


def test_without_a_random_control_sqrt_k_over_d_is_the_reference():
    table = judged(decisive_rows({"gradient": [0.3] * 20}))
    assert table.loc["gradient", "threshold"] == pytest.approx(0.1 + 0.05)
    assert "sqrt(k/d)" in table.loc["gradient", "note"]


def test_a_bad_manifold_or_an_untrained_model_makes_every_row_not_valid():
    fractions = {"random": [0.1] * 20, "gradient": [0.5] * 20}
    bad_fit = judged(decisive_rows(fractions, r2=0.3))
    assert (bad_fit["verdict"] == "not valid").all()
    assert bad_fit["note"].str.contains("test.min_reconstruction=0.5").all()
    assert judged(decisive_rows(fractions, r2=0.3), test={"min_reconstruction": 0.2}).loc["gradient",
                                                                                          "verdict"] == "aligned"
    untrained = judged(decisive_rows(fractions, correct=False))
    assert (untrained["verdict"] == "not valid").all() and untrained["note"].str.contains("near chance").all()
    # explaining the labels says nothing of the model's accuracy: no such precondition then
    assert judged(decisive_rows(fractions, correct=False), target="label").loc["gradient", "verdict"] == "aligned"


# ---------------------------------------------------------------- runs


MANIFOLD = ("test=manifold", "test.vae_epochs=10", "method=[gradient,random]")
DECODED = ("test=manifold", "dataset=decoded", "test.decoder._target_=sanity_cli.manifold.exact_decoder",
           "train.epochs=3", "n_images=32", "n_examples=2", "method=[gradient,random]")


@pytest.fixture
def runs(make_cfg, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.getbasetemp() / "manifold_runs", make_cfg)


def test_a_run_writes_shares_of_both_states_and_a_verdict_per_method(runs):
    from sanity_cli.verdict import write_verdicts

    run = runs(*MANIFOLD)
    one = run.rows(step=1)
    assert set(one["metric"]) == {check.FRACTION, check.RECONSTRUCTION, check.CHANCE}
    assert np.allclose(run.rows(step=0, metric=check.FRACTION)["value"], 1.0)
    assert np.allclose(one[one["metric"] == check.CHANCE]["value"], math.sqrt(10 / 144))
    shares = one[one["metric"] == check.FRACTION]
    assert shares["value"].between(0, 1).all() and len(shares) == 2 * 8
    # the kept maps: unit maps at step 0, their projections at step 1, whose lengths are the shares
    kept = run.maps("gradient", 1)
    lengths = np.linalg.norm(kept.reshape(len(kept), -1), axis=1)
    assert np.allclose(lengths, run.column("value", 1, method="gradient", metric=check.FRACTION), atol=2e-3)
    for method in ("gradient", "random"):  # step 1 projects step 0's own maps: the rest is orthogonal to the part
        whole, part = (run.maps(method, step).reshape(len(kept), -1) for step in (0, 1))
        assert np.allclose(np.linalg.norm(whole, axis=1), 1, atol=2e-3)
        assert np.abs(((whole - part) * part).sum(axis=1)).max() < 5e-3
    verdicts = write_verdicts(run.dir).set_index("method")
    assert verdicts.loc["random", "is_control"] and not verdicts.loc["gradient", "is_control"]
    assert verdicts.loc["gradient", "threshold"] == pytest.approx(verdicts.loc["random", "ci_high"] + 0.05)
    assert (run.dir / "robustness.csv").read_text().count("\n") == 1  # nothing compared: no variants


def test_on_manifold_data_the_models_gradient_is_more_aligned_than_random(runs):
    from sanity_cli.verdict import write_verdicts

    run = runs(*DECODED)
    assert np.allclose(run.rows(step=1, metric=check.RECONSTRUCTION)["value"], 1.0)
    assert np.allclose(run.rows(step=1, metric=check.CHANCE)["value"], math.sqrt(4 / 144))
    verdicts = write_verdicts(run.dir).set_index("method")
    assert verdicts.loc["gradient", "ci_low"] > verdicts.loc["random", "ci_high"]
    assert verdicts.loc["gradient", "verdict"] == "aligned"
    assert verdicts.loc["random", "verdict"] == "not aligned"


def test_a_model_at_chance_gives_not_valid_rows(runs):
    from sanity_cli.verdict import write_verdicts

    run = runs(*MANIFOLD, "labels=shuffled", "n_images=20")
    verdicts = write_verdicts(run.dir)
    assert (verdicts["verdict"] == "not valid").all(), verdicts[["method", "verdict", "note"]]
    assert verdicts["note"].str.contains("near chance").all()
    assert not verdicts["note"].str.contains("reconstructs").any()


def test_the_vae_is_cached_and_trained_anew_when_its_settings_change(runs):
    calls = []
    fit = manifold.fit_vae

    def counted(*args, **kwargs):
        calls.append(1)
        return fit(*args, **kwargs)

    with mock.patch.object(manifold, "fit_vae", counted):
        base = ("test=manifold", "test.vae_epochs=1", "method=[gradient]", "n_images=2", "n_examples=1")
        runs.fresh(*base)
        assert len(calls) == 1
        for keeps in ((), ("test.margin=0.2",), ("test.min_reconstruction=0.9",), ("n_images=3",),
                      ("train.epochs=2",)):
            runs.fresh(*base, *keeps)
            assert len(calls) == 1, f"{keeps} trained the VAE again"
        for flip in (("test.latent_dim=3",), ("test.vae_epochs=2",), ("test.vae_lr=0.002",), ("seed=1",),
                     ("dataset.image_size=10",)):
            before = len(calls)
            runs.fresh(*base, *flip)
            assert len(calls) == before + 1, f"{flip} used the cached VAE"


@pytest.mark.parametrize(("setting", "message"), [
    ("test.latent_dim=0", "test.latent_dim must be at least 1, not 0"),
    ("test.latent_dim=145", "test.latent_dim=145 must be below the number of pixels d=144 (1x12x12)"),
])
def test_a_latent_dimension_out_of_range_is_one_line_and_exit_2(tmp_path, capsys, setting, message):
    try:  # refused by validation (a return) or by the run itself (an exit from inside Hydra's main)
        code = cli.main(["run", "test=manifold", setting, "dataset.image_size=12", "device=cpu",
                         f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"])
    except SystemExit as stopped:
        code = stopped.code
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith(f"sanity: error: {message}") and "\n" not in error
    assert not list((tmp_path / "cache").glob("*.pt"))  # refused before any training


def test_the_findings_script_tabulates_a_run(runs):
    import importlib.util
    from pathlib import Path

    from sanity_cli.verdict import write_verdicts

    run = runs(*MANIFOLD)
    write_verdicts(run.dir)
    path = Path(__file__).resolve().parent.parent / "scripts" / "manifold_findings.py"
    spec = importlib.util.spec_from_file_location("manifold_findings", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.table(run.dir)
    assert "| gradient |" in text and "| random (control) |" in text
    assert f"sqrt(k/d) = {math.sqrt(10 / 144):.3f}" in text


def test_check_from_python_says_it_has_no_manifold():
    from sanity_cli import check as run_check
    from sanity_cli.errors import SanityError

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with pytest.raises(SanityError, match="test=manifold needs the data manifold"):
        run_check(model, torch.rand(4, 1, 4, 4), ["gradient"], "manifold")


def test_chunks_of_images_give_the_same_shares(runs):
    """With several chunks step 0's maps wait on disk, and step 1 projects them from there."""
    whole, chunked = runs(*MANIFOLD), runs(*MANIFOLD, "image_chunk=3")
    key = ["step", "method", "metric", "image"]
    a, b = (run.results.sort_values(key).reset_index(drop=True) for run in (whole, chunked))
    assert a[key].equals(b[key])
    np.testing.assert_allclose(a["value"], b["value"], rtol=0, atol=1e-6)
