"""`sanity card`: every check on one model and dataset, read into one page per method.

One tiny card (cascade, random_logit and data on a CNN trained one epoch, six images, two
draws) is made once for the module through the command line; the tests read it back from
its files and compare it with each check's own verdict.csv."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sanity_cli import card as card_module
from sanity_cli import checks, cli
from sanity_cli.errors import SanityError
from sanity_cli.runstore import RunStore
from small_runs import page_in_browser

# ++test.shuffled_epochs=1: the shuffled-label model cannot memorize its labels in one epoch, so the data
# check's precondition fails on purpose; six images: the model's accuracy on them is above chance at the 95%
# level (on four it need not be: then every check is not valid); ++test.seeds=2 keeps two draws
CARD_ARGS = ["device=cpu", "dataset.image_size=12", "train.epochs=1", "n_images=6", "n_examples=1",
             "method=[gradient,edge,random]", "metrics.names=[spearman_abs,spearman]", "++test.seeds=2",
             "++test.shuffled_epochs=1", "card.checks=[cascade,random_logit,data]"]


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory) -> Path:
    """A finished card of three checks; its model cache of its own."""
    top = tmp_path_factory.mktemp("card")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SANITY_CACHE_DIR", str(top / "cache"))
        patch.setenv("SANITY_DATA_DIR", str(top / "data"))
        assert cli.main(["card", *CARD_ARGS, "--out", str(top / "card")]) == 0
    return top / "card"


def read_card(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "card.csv", keep_default_na=False)


def deciding(run: Path) -> pd.DataFrame:
    verdicts = pd.read_csv(run / "verdict.csv")
    return verdicts[verdicts["decides"]]


def test_the_card_has_a_run_per_check_in_its_own_directory(tiny_card):
    table = read_card(tiny_card)
    assert list(dict.fromkeys(table["check"])) == ["cascade", "random_logit", "data"]  # card.checks' order
    for check in ("cascade", "random_logit", "data"):
        assert (tiny_card / check / "verdict.csv").is_file() and (tiny_card / check / "report.html").is_file()
    assert set(table["method"]) == {"gradient", "edge", "random"}
    assert set(table.loc[table["is_control"].astype(str) == "True", "method"]) == {"edge", "random"}


def test_the_matrix_agrees_with_each_checks_verdict_csv(tiny_card):
    table = read_card(tiny_card)
    assert len(table) == 9
    for row in table.itertuples(index=False):
        own = deciding(tiny_card / row.check).set_index("method").loc[row.method]
        assert row.verdict == own["verdict"] and row.test == own["test"]
        np.testing.assert_allclose([float(row.mean), float(row.ci_low), float(row.ci_high)],
                                   [own["mean"], own["ci_low"], own["ci_high"]])
        assert row.holds_in == own["holds_in"] and row.report == f"{row.check}/report.html"
    html = (tiny_card / "card.html").read_text()
    assert html.count('href="cascade/report.html"') == 3  # every cell links to its check's report


def test_a_failed_precondition_shows_not_valid_in_its_cell(tiny_card):
    table = read_card(tiny_card).set_index(["method", "check"])
    cell = table.loc[("gradient", "data")]
    assert cell["verdict"] == "not valid" and "has not memorized its labels" in cell["note"]
    assert table.loc[("gradient", "cascade"), "verdict"] != "not valid"
    assert table.loc[("gradient", "data"), "standing"] != "passes"
    html = (tiny_card / "card.html").read_text()
    assert "cannot be judged on" in html and "not valid: the shuffled-label model reached" in html


def test_a_method_that_fails_one_check_is_not_shown_as_trustworthy(tiny_card, tmp_path):
    """The card of finished runs (no recomputing): one check's verdict.csv turned to fail for gradient."""
    copy = tmp_path / "card"
    shutil.copytree(tiny_card, copy, ignore=shutil.ignore_patterns("card.*"))
    for check in ("cascade", "random_logit", "data"):  # every other check passes it
        path = copy / check / "verdict.csv"
        verdicts = pd.read_csv(path)
        gradient = verdicts["method"] == "gradient"
        verdicts.loc[gradient, "verdict"] = "fail" if check == "random_logit" else "pass"
        verdicts.loc[gradient, "note"] = ""
        verdicts.to_csv(path, index=False)
    assert cli.main(["card", str(copy)]) == 0
    table = read_card(copy)
    assert set(table.loc[table["method"] == "gradient", "standing"]) == {"fails"}
    html = (copy / "card.html").read_text()
    gradient_card = html.split("<h3>gradient")[1].split("</div>")[0]
    assert "fails a check: not to be trusted" in gradient_card and "passes every check" not in gradient_card
    assert "fails random_logit" in gradient_card
    # and with no fail, it passes every check: what decides is the one fail
    path = copy / "random_logit" / "verdict.csv"
    verdicts = pd.read_csv(path)
    verdicts.loc[verdicts["method"] == "gradient", "verdict"] = "pass"
    verdicts.to_csv(path, index=False)
    assert cli.main(["card", str(copy)]) == 0
    assert set(read_card(copy).query("method == 'gradient'")["standing"]) == {"passes"}
    assert "necessary, not sufficient" in (copy / "card.html").read_text()


def test_the_card_of_a_resumed_run_equals_an_uninterrupted_one(tiny_card, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SANITY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SANITY_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "card"
    finished = []
    original = RunStore.finish_state

    def finish_then_stop(self, *state):
        original(self, *state)
        finished.append(state)
        if len(finished) == 7:  # in the middle of the cascade (2 draws x 5 states), the sweep's first job
            raise KeyboardInterrupt

    monkeypatch.setattr(RunStore, "finish_state", finish_then_stop)
    assert cli.main(["card", *CARD_ARGS, "--out", str(out)]) == 130
    assert "continue it with: sanity card" in capsys.readouterr().err
    assert not (out / "card.csv").exists()
    monkeypatch.setattr(RunStore, "finish_state", original)
    assert cli.main(["card", *CARD_ARGS, "--out", str(out)]) == 0
    resumed, whole = read_card(out), read_card(tiny_card)
    pd.testing.assert_frame_equal(resumed.drop(columns="run"), whole.drop(columns="run"))
    assert (out / "card.html").read_text() == (tiny_card / "card.html").read_text()


def test_checks_come_from_the_registry_and_apply_to_the_model(monkeypatch):
    settings = card_module.card_settings()
    names = [c.name for c in card_module.columns_for(settings, trainable=True)]
    by_name = {c.name: c for c in card_module.columns_for(settings, trainable=True)}
    assert by_name["smooth_cascade"].overrides[0] == "test=smooth_cascade"  # conf/card.yaml's own settings
    assert "test.shuffled_epochs=60" in by_name["data"].overrides
    assert names[:2] == ["cascade", "cascade_bottom_up"]
    assert set(names) == {*card_module.checks.CHECKS, "cascade_bottom_up"}
    # a model not trained here (a checkpoint, a hub model) cannot be trained on shuffled labels
    assert "data" not in [c.name for c in card_module.columns_for(settings, trainable=False)]
    # a check registered later is on the card without any change to it
    monkeypatch.setitem(card_module.checks.CHECKS, "spurious", card_module.checks.CHECKS["cascade"])
    assert "spurious" in [c.name for c in card_module.columns_for(settings, trainable=True)]


def test_the_card_runs_its_checks_as_multiruns(tmp_path, monkeypatch):
    """What `sanity card` hands Hydra: one sweep of the checks with their own settings, each its own
    subdirectory; columns with settings of their own as sweeps of their own; card.runs before the
    user's overrides; a finished check not again."""
    calls = []
    monkeypatch.setattr(cli, "run", lambda argv: calls.append(argv) or 0)
    args = ["n_images=5", "card.runs=[device=cpu]", "card.checks=[cascade,cascade_bottom_up,entropy,random_logit]",
            "card.overrides={entropy: [test.bins=10]}"]
    with pytest.raises(SanityError, match="holds no run"):  # nothing ran (cli.run is replaced): no run to read
        card_module.run_card(args, tmp_path)
    sweep, bottom_up, entropy = calls
    assert sweep[:2] == ["-m", "test=cascade,random_logit"] and "hydra.sweep.subdir=${test.name}" in sweep
    assert bottom_up[:3] == ["-m", "test=cascade", "test.order=bottom_up"]
    assert "hydra.sweep.subdir=cascade_bottom_up" in bottom_up
    assert entropy[:3] == ["-m", "test=entropy", "test.bins=10"] and "hydra.sweep.subdir=entropy" in entropy
    for argv in calls:
        assert argv.index("device=cpu") < argv.index("n_images=5") and "resume=true" in argv
        assert f'hydra.sweep.dir="{tmp_path}"' in argv


def test_a_finished_check_is_not_run_again(tiny_card, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run", lambda argv: calls.append(argv) or 0)
    copy = tmp_path / "card"
    shutil.copytree(tiny_card, copy)
    made, failures = card_module.run_card(CARD_ARGS, copy)
    assert calls == [] and failures == [] and made.html.is_file()


def test_a_card_directory_with_spaces_and_brackets(tmp_path, monkeypatch):
    """The directory reaches Hydra quoted; what Hydra cannot take is refused in one line."""
    calls = []
    monkeypatch.setattr(cli, "run", lambda argv: calls.append(argv) or 0)
    odd = tmp_path / "my cards [v1]"
    with pytest.raises(SanityError, match="is not a directory"):  # nothing ran: cli.run is replaced
        card_module.run_card(["card.checks=[random_logit]"], odd)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep_dir = next(a for a in calls[0] if a.startswith("hydra.sweep.dir="))
    assert OverridesParser.create().parse_override(sweep_dir).value() == str(odd)
    with pytest.raises(SanityError, match="holds a quote"):
        card_module.run_card(["card.checks=[random_logit]"], tmp_path / 'a"b')


@pytest.mark.parametrize("args, message", [
    (["card.chekcs=[cascade]"], "unknown card setting 'card.chekcs'; the card's settings are card.checks"),
    (["card.checks=[cascade,nope]"], "unknown check 'nope' in card.checks; choose from: cascade, cascade_bottom_up"),
    (["test=cascade"], "choose them with card.checks=[...] rather than test=cascade"),
    (["hydra.sweep.dir=/tmp/x"], "the card sets hydra.sweep.dir itself"),
    (["model=nope"], "unknown model 'nope'"),
    (["seed=0,1"], "a card is of one setting"),
    (["card.runs=5"], "card.runs must be a list of overrides"),
    (["-m"], "unknown option '-m'"),
    (["shard=0/2"], "a card reads whole runs; leave out shard="),
    (["card.overrides={nope: [test.bins=3]}"], "card.overrides.nope must be a list of overrides of one of"),
])
def test_bad_card_arguments_fail_in_one_line(args, message, tmp_path, capsys):
    assert cli.main(["card", *args, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_runs_of_two_models_are_not_one_card(tiny_card, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_card / "cascade", other)
    info = (other / "run.json").read_text().replace('"name": "cnn"', '"name": "mlp"', 1)
    (other / "run.json").write_text(info)
    assert cli.main(["card", str(tiny_card / "random_logit"), str(other), "--out", str(tmp_path / "c")]) == 2
    assert "they differ in model" in capsys.readouterr().err


def test_a_browser_renders_the_card_with_every_image_and_fetches_nothing(tiny_card, tmp_path):
    with page_in_browser(tiny_card / "card.html", 1400) as (view, requests):
        widths = view.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        pills = view.evaluate("document.querySelectorAll('td.cell .verdict').length")
        links = view.evaluate("Array.from(document.querySelectorAll('td.cell a')).map(a => a.href)")
    assert len(widths) == 3 and min(widths) > 0  # each check's verdict figure, decoded
    assert pills == 9 and all(Path(link.removeprefix("file://")).is_file() for link in links)
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def test_a_check_with_a_verdict_per_block_is_one_cell_by_its_weakest_block():
    """The independent test judges each block: the cell is the method's verdict over the blocks (a fail
    in one block fails it), shown by the block nearest to failing, with how many blocks pass."""
    blocks = pd.DataFrame({"method": "gradient", "is_control": False, "test": "independent", "metric": "spearman_abs",
                           "block": ["fc2", "fc1", "conv2", "conv1"], "verdict": ["pass", "fail", "pass", "fail"],
                           "mean": [0.1, 0.7, 0.3, 0.9], "ci_low": [0.05, 0.6, 0.2, 0.8],
                           "ci_high": [0.15, 0.8, 0.4, 0.95], "level": 0.95, "threshold": 0.5, "change": "below",
                           "holds_in": "8/8", "seeds_agree": "3/3", "n_seeds": 3, "borderline": False, "note": ""})
    cell = card_module._cell(blocks)
    assert (cell["verdict"], cell["block"], cell["mean"], cell["blocks"]) == ("fail", "conv1", 0.9, "2/4 pass")
    passing = blocks.assign(verdict="pass")
    cell = card_module._cell(passing)
    assert (cell["verdict"], cell["block"], cell["blocks"]) == ("pass", "conv1", "4/4 pass")
    # the entropy test's change lies above its threshold: the weakest block has the lowest rise
    rising = passing.assign(change="above", threshold=0.05)
    assert card_module._cell(rising)["block"] == "fc2"


def test_help_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "run", lambda argv: pytest.fail("--help ran the card"))
    assert cli.main(["card", "--help"]) == 0
    assert "card.checks" in capsys.readouterr().out


def test_a_check_that_failed_shows_why_in_its_cells(tiny_card, tmp_path):
    copy = tmp_path / "card"
    shutil.copytree(tiny_card, copy, ignore=shutil.ignore_patterns("card.*"))
    (copy / "entropy").mkdir()
    (copy / "entropy" / "error.txt").write_text("entropy needs at least 2 bins\n")
    made = card_module.build_card([copy])
    cells = made.table[made.table["check"] == "entropy"]
    assert set(cells["method"]) == {"gradient", "edge", "random"} and set(cells["verdict"]) == {"not run"}
    assert all("entropy needs at least 2 bins" in note for note in cells["note"])
    assert made.standings["gradient"] in ("incomplete", "fails")  # never passes with a check missing
    assert "entropy needs at least 2 bins" in made.html.read_text()


def test_the_positive_tests_words_count_as_what_they_mean_for_trust():
    """spurious decides by K-SSD gain (detects or not) and FAM (a false alarm or not), manifold by
    alignment: on the card a method that finds the planted cause without false alarms passes,
    one that raises a false alarm fails, and the cell's note keeps the measure's own word."""
    def rows(test, blocks, words):
        return pd.DataFrame({"method": "gradient", "is_control": False, "test": test, "metric": "spearman_abs",
                             "block": blocks, "verdict": words, "mean": 0.4, "ci_low": 0.3, "ci_high": 0.5,
                             "level": 0.95, "threshold": 0.1, "change": "above", "holds_in": "", "seeds_agree": "",
                             "n_seeds": 1, "borderline": False, "note": ""})

    found = card_module._cell(card_module.in_card_words(rows("spurious", ["K-SSD gain", "FAM"],
                                                             ["detects", "no false alarm"])))
    assert (found["verdict"], found["blocks"]) == ("pass", "2/2 pass")
    alarm = card_module._cell(card_module.in_card_words(rows("spurious", ["K-SSD gain", "FAM"],
                                                             ["detects", "false alarm"])))
    assert alarm["verdict"] == "fail" and alarm["block"] == "FAM" and alarm["note"].startswith("FAM: false alarm")
    assert card_module._cell(card_module.in_card_words(rows("manifold", ["tangent space"], ["not aligned"])))[
        "verdict"] == "fail"
    table = pd.DataFrame([{"method": "gradient", "check": "cascade", "verdict": "pass", "is_control": False},
                          {"method": "gradient", "check": "manifold", "verdict": "pass", "is_control": False},
                          {"method": "gradient", "check": "spurious", "verdict": alarm["verdict"],
                           "is_control": False}])
    assert card_module.standings(table) == {"gradient": "fails"}
    # a similarity check's words are its own already: nothing changes
    plain = rows("cascade", ["conv1"], ["inconclusive"])
    pd.testing.assert_frame_equal(card_module.in_card_words(plain), plain)


def test_the_reading_says_what_a_positive_tests_pass_shows_and_when_a_control_passes_too():
    """A pass of spurious or manifold says what the map found (the check's own words), a
    randomization pass keeps the "necessary, not sufficient" reading, a fail of a positive test
    says what it missed, and a control that passes the same positive test is named."""
    def row(method, check, verdict, control=False):
        return {"method": method, "check": check, "verdict": verdict, "is_control": control, "note": ""}

    table = pd.DataFrame([row("gradient", "cascade", "pass"), row("gradient", "manifold", "pass"),
                          row("gradient", "spurious", "fail"), row("edge", "manifold", "pass", True),
                          row("random", "manifold", "fail", True), row("random", "cascade", "pass", True)])
    text = card_module.reading("gradient", table)
    assert "under manifold, " + checks.get("manifold").pass_meaning("top_down") in text
    assert "under spurious, " + checks.get("spurious").fail_meaning("top_down") in text
    assert "(the edge control passes manifold as well" in text and "the random control" not in text
    assert "A pass of a check that randomizes shows only that the map changes" in text
    assert "random noise passes cascade as well" in text
    alone = card_module.reading("gradient", table[table["check"] == "cascade"])
    assert "positive test" not in alone and "A pass of a check shows only" in alone
