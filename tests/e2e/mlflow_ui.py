"""A real ``mlflow server`` over a SQLite store, and the steps a user takes in its UI.

The steps are written against what the user sees (button names, column titles, link texts) rather
than MLflow's internal component ids, so the test breaks where a user would notice a change.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.conftest import free_port
from tests.ray_jobs.servers import VENV_BIN, _wait_http

TAG_COLUMNS = ("method", "size", "fold")


@dataclass(frozen=True)
class UiServer:
    url: str
    log: Path


@contextmanager
def mlflow_ui_server(db: Path, root: Path) -> Iterator[tuple[UiServer, subprocess.Popen]]:
    """Start ``mlflow server`` on a free loopback port; yields before it is ready (see :func:`wait_ready`).

    Yielding early lets the caller run the study while the server imports itself; the database schema
    must already exist (two processes creating it at once would race).
    """
    port = free_port()
    log = root / "mlflow-server.log"
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield UiServer(url=f"http://127.0.0.1:{port}", log=log), proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the uvicorn workers go too
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def wait_ready(server: UiServer, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    _wait_http(server.url + "/health", proc, server.log, timeout=timeout)


def open_runs_table(page, server: UiServer, experiment_id: str, parent_name: str) -> None:
    """The experiment's runs table in "Model training" mode, assistant panel closed.

    MLflow 3 opens an experiment in GenAI mode (trace overview, onboarding pop-ups); the mode switch
    puts ``workflowType=machine_learning`` into the address, which is what is opened here.
    """
    page.goto(f"{server.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    page.get_by_role("link", name=parent_name, exact=True).wait_for()
    page.get_by_role("button", name="Model training").wait_for()
    close_side_panels(page)


def close_side_panels(page) -> None:
    """Close what MLflow 3 opens over a page: a "what's new" dialog (Escape) and the MLflow Assistant
    side panel, which narrows the page's table."""
    page.keyboard.press("Escape")
    close = page.get_by_role("button", name="Close")
    try:
        close.first.wait_for(timeout=15_000)
    except PlaywrightTimeout:
        return  # no assistant panel in this build: nothing to close
    close.first.click()


def add_tag_columns(page, tags: tuple[str, ...] = TAG_COLUMNS) -> None:
    """Columns menu -> search each tag -> tick it in the "Tags" group (params share some names)."""
    for tag in tags:
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill(tag)
        node = page.locator("xpath=//div[contains(@class,'tree-treenode')][.//span[starts-with(@title,'Tags (')]]"
                            f"/following-sibling::div[.//span[@title='{tag}']][1]")
        node.locator("[class$='tree-checkbox']").click()
        page.keyboard.press("Escape")
        page.locator(".ag-header-cell", has_text=tag).first.wait_for()


def expand_run(page, name: str) -> None:
    """The "+" beside a parent run shows its child runs."""
    row = page.locator(".ag-pinned-left-cols-container .ag-row",
                       has=page.get_by_role("link", name=name, exact=True))
    row.get_by_role("button").first.click()


def read_runs_table(page) -> dict[str, dict[str, str]]:
    """Run name -> {column title: shown text}, read from the rendered grid (pinned + scrolled parts)."""
    titles = {c.get_attribute("col-id"): c.inner_text().strip() for c in page.locator(".ag-header-cell").all()}
    table: dict[str, dict[str, str]] = {}
    for left in page.locator(".ag-pinned-left-cols-container .ag-row").all():
        name = left.get_by_role("link").first.inner_text().strip()
        center = page.locator(f".ag-center-cols-container .ag-row[row-index='{left.get_attribute('row-index')}']")
        table[name] = {titles.get(c.get_attribute("col-id"), c.get_attribute("col-id")): c.inner_text().strip()
                       for c in center.locator(".ag-cell").all()}
    return table


def select_runs(page, names: tuple[str, ...]) -> None:
    for name in names:
        row = page.locator(".ag-pinned-left-cols-container .ag-row",
                           has=page.get_by_role("link", name=name, exact=True))
        row.locator("input.ag-checkbox-input").check()


def compare_rows(page) -> list[list[str]]:
    """Every table row of the compare page as its shown cells (run details, params, metrics, tags)."""
    return [[c.strip() for c in r.split("\t")] for r in page.locator("tr").all_inner_texts()]


def compare_row(page, header: str) -> list[str]:
    """The values of the first compare-page row headed ``header`` ("Run Name:", "method", ...)."""
    rows = compare_rows(page)
    return next((r[1:] for r in rows if r and r[0] == header), [])
