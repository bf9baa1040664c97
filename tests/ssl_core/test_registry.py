"""The one registry helper behind the sources, the reduction strategies and the SSL methods."""

from __future__ import annotations

import sys

import pytest

from ctssl_base.registry import Registry

#: plug-in modules written by the test below, looked up only after it has written them
PLUGINS: Registry[type] = Registry("plugin", modules=["ctssl_test_plugin_ok", "ctssl_test_plugin_not_written_yet"])


class Oops(Exception):
    pass


def test_register_get_names_and_a_clear_error_for_an_unknown_name():
    reg: Registry[type] = Registry("widget", error=Oops)

    @reg.register("b")
    class B:
        pass

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and A.name == "a" and B.name == "b"
    assert reg.names() == ["a", "b"]  # sorted
    assert list(reg) == ["b", "a"] and reg.values() == [B, A]  # registration order
    assert "a" in reg and "c" not in reg and len(reg) == 2
    with pytest.raises(Oops, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")
    reg.register("a")(A)  # the same object again is harmless
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(type("Other", (), {}))


def test_modules_load_on_first_lookup_a_missing_one_is_skipped_a_broken_one_raises(tmp_path, monkeypatch):
    (tmp_path / "ctssl_test_plugin_ok.py").write_text(
        "from tests.ssl_core.test_registry import PLUGINS\n"
        "@PLUGINS.register('ok')\nclass Ok:\n    pass\n")
    (tmp_path / "ctssl_test_plugin_broken.py").write_text("import ctssl_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ctssl_test_plugin_ok" not in sys.modules  # nothing imported before the first lookup
    assert PLUGINS.names() == ["ok"]
    broken = Registry("plugin", modules=["ctssl_test_plugin_broken"])
    with pytest.raises(ModuleNotFoundError, match="ctssl_no_such_dependency"):
        broken.names()


def test_the_three_project_registries_use_it():
    from data_prep.reduce import STRATEGIES
    from data_prep.sources import SOURCES
    from ssl_core.methods import METHOD_NAMES, METHODS

    assert all(isinstance(r, Registry) for r in (SOURCES, STRATEGIES, METHODS))
    assert sorted(METHOD_NAMES) == METHODS.names()
    assert {"dicom", "nifti"} <= set(SOURCES.names()) and "hash" in STRATEGIES
