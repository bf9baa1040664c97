"""The fine-tuning study as a user sees it: MLflow's UI in headless Chromium, and the report's HTML.

A small finished study (2 encoders x 2 sizes x 2 folds, tracked in SQLite) is served by a real
``mlflow server``; the tests click through the UI the way a user compares methods and save a
screenshot of every page they check.
"""

from __future__ import annotations

from tests.e2e.browser import is_png
from tests.e2e.mlflow_ui import (
    add_tag_columns,
    close_side_panels,
    compare_row,
    expand_run,
    open_runs_table,
    read_runs_table,
    select_runs,
)
from tests.e2e.study import ENCODERS, EXPERIMENT, FOLDS, MODEL, SIZES


def test_experiment_page_lists_parent_and_child_runs_with_their_method_size_fold_tags(page, study, ui, shots):
    open_runs_table(page, ui, study.experiment_id, study.parent_name)
    page.get_by_text("9 matching runs").wait_for()  # 1 study run + 2 x 2 x 2 trials
    add_tag_columns(page)
    expand_run(page, study.parent_name)
    page.get_by_role("link", name=study.children[-1].name, exact=True).wait_for()
    shot = shots / "experiment_runs_with_tags.png"
    page.screenshot(path=str(shot), full_page=True)

    table = read_runs_table(page)
    assert set(table) == {study.parent_name, *(c.name for c in study.children)}
    assert len(study.children) == len(ENCODERS) * len(SIZES) * FOLDS == 8
    for c in study.children:  # e.g. "seeded-n2-fold1-seed0" shows method seeded, size n2, fold 1
        shown = table[c.name]
        assert (shown["method"], shown["size"], shown["fold"]) == (c.method, c.size, c.fold), (c, shown)
    assert {(table[c.name]["method"], table[c.name]["size"]) for c in study.children} == {
        (e, s) for e in ENCODERS for s in SIZES}
    assert {table[c.name]["fold"] for c in study.children} == {"0", "1"}
    assert (table[study.parent_name]["method"], table[study.parent_name]["size"]) == ("-", "-")  # not a trial
    assert is_png(shot)


def test_compare_view_opens_for_two_child_runs_and_shows_both_names_and_methods(page, study, ui, shots):
    by_name = {c.name: c for c in study.children}
    pair = ("random-n2-fold0-seed0", "seeded-n2-fold0-seed0")
    assert set(pair) <= set(by_name)
    open_runs_table(page, ui, study.experiment_id, study.parent_name)
    expand_run(page, study.parent_name)
    select_runs(page, pair)
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
    page.get_by_role("rowheader", name="Run Name:", exact=True).wait_for()
    shot = shots / "compare_two_runs.png"
    page.screenshot(path=str(shot), full_page=True)

    page.locator("tr").filter(has=page.get_by_text("pretrain_method", exact=True)).scroll_into_view_if_needed()
    tags_shot = shots / "compare_two_runs_tags.png"  # the page scrolls inside a panel: a second view
    page.screenshot(path=str(tags_shot))

    assert "#/compare-runs?runs=" in page.url
    assert {by_name[n].run_id for n in pair} == set(compare_row(page, "Run ID:"))
    assert sorted(compare_row(page, "Run Name:")) == sorted(pair)
    assert sorted(compare_row(page, "method")) == ["random", "seeded"]  # the tag that differs
    assert compare_row(page, "size") == ["n2", "n2"] and compare_row(page, "fold") == ["0", "0"]
    assert is_png(shot) and is_png(tags_shot)


def test_report_html_renders_with_every_plot_loaded(page, study, shots):
    page.goto(study.report_html.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    images = page.evaluate(
        "Array.from(document.images).map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight}))")
    shot = shots / "report_html.png"
    page.screenshot(path=str(shot), full_page=True)

    assert len(images) >= 1 and images[0]["alt"] == "AUC vs training-set size"
    assert all(i["w"] > 0 and i["h"] > 0 for i in images), images
    assert page.title() == EXPERIMENT
    assert page.get_by_role("heading", level=1).inner_text() == f"Fine-tuning study `{EXPERIMENT}`"
    assert f"MLflow parent run {study.parent_run_id}; 8 finished trials" in page.inner_text("body")
    assert page.locator("code", has_text=study.parent_run_id).count() == 1  # markdown code marks rendered
    headings = page.get_by_role("heading", level=2).all_inner_texts()
    assert headings[:2] == ["Verdict at the smallest training-set size", "Test metrics (mean ± std over folds)"]
    assert any(h.startswith("Patient-level bootstrap") for h in headings)
    rows = [r.split("\t")[:3] for r in page.locator("table").first.locator("tr").all_inner_texts()]
    assert rows[0] == ["encoder", "size", "n_trials"]
    assert sorted(rows[1:]) == [["random", "all", "2"], ["random", "n2", "2"], ["seeded", "all", "2"],
                                ["seeded", "n2", "2"]]
    assert is_png(shot)


def test_the_registry_lists_the_encoder_and_its_version(page, study, ui, shots):
    page.goto(f"{ui.url}/#/models")
    page.get_by_role("link", name=MODEL, exact=True).wait_for()
    close_side_panels(page)
    row = page.get_by_role("row").filter(has=page.get_by_role("link", name=MODEL, exact=True))
    shot = shots / "registered_models.png"
    page.screenshot(path=str(shot))
    listed = row.inner_text()

    page.goto(f"{ui.url}/#/models/{MODEL}")
    page.get_by_role("link", name=f"Version {study.model_version}", exact=True).wait_for()
    close_side_panels(page)
    version_shot = shots / "registered_model_versions.png"
    page.screenshot(path=str(version_shot))

    assert study.model_version == "1"  # one pre-training run, one version
    assert MODEL in listed and f"Version {study.model_version}" in listed
    assert is_png(shot) and is_png(version_shot)
