"""One finished study, one ``mlflow server`` and one headless Chromium, shared by the UI tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.browser import ACTION_TIMEOUT_MS, CHROMIUM_ARGS, VIEWPORT, artifacts_dir, require_chromium
from tests.e2e.mlflow_ui import UiServer, mlflow_ui_server, wait_ready
from tests.e2e.study import FinishedStudy, create_store, make_finished_study


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    return require_chromium()  # first, so a missing browser fails before a minute of fine-tuning


@pytest.fixture(scope="module")
def study_and_server(chromium_path, tmp_path_factory) -> Iterator[tuple[FinishedStudy, UiServer]]:
    root = tmp_path_factory.mktemp("e2e-study")
    db = root / "mlflow.db"
    create_store(db)
    with mlflow_ui_server(db, root) as (server, proc):  # starts while the study runs
        study = make_finished_study(root, db)
        wait_ready(server, proc)
        yield study, server


@pytest.fixture(scope="module")
def study(study_and_server) -> FinishedStudy:
    return study_and_server[0]


@pytest.fixture(scope="module")
def ui(study_and_server) -> UiServer:
    return study_and_server[1]


@pytest.fixture(scope="module")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context per test (no UI state such as column choices carried over)."""
    ctx = browser.new_context(viewport=VIEWPORT)
    ctx.set_default_timeout(ACTION_TIMEOUT_MS)
    ctx.set_default_navigation_timeout(ACTION_TIMEOUT_MS)
    pg = ctx.new_page()
    try:
        yield pg
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return artifacts_dir(tmp_path_factory.mktemp("e2e-screenshots"))
