"""The UI tests refuse to pass silently on a machine without the browser."""

from __future__ import annotations

import pytest

from tests.e2e import browser


def test_missing_chromium_fails_the_test_and_names_the_install_script(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception) as err:
        browser.require_chromium()
    assert str(err.value) == (f"{tmp_path / 'no-chromium'} not found: the MLflow UI test needs Debian's chromium "
                              "package; install it with `.ci/install-browser.sh` (apt-get install chromium)")


def test_screenshots_go_to_the_folder_ci_names(monkeypatch, tmp_path):
    monkeypatch.setenv("CTSSL_E2E_ARTIFACTS", str(tmp_path / "ci-artifacts" / "e2e"))
    assert browser.artifacts_dir(tmp_path / "default") == tmp_path / "ci-artifacts" / "e2e"
    assert (tmp_path / "ci-artifacts" / "e2e").is_dir() and not (tmp_path / "default").exists()
    monkeypatch.delenv("CTSSL_E2E_ARTIFACTS")
    assert browser.artifacts_dir(tmp_path / "default") == tmp_path / "default"
