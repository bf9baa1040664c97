"""Adding a pre-training method is one module in ssl_core/methods: the registry, the study schema's
method names and default, the chart's values schema, the CLI's help and the view recipes all find it
without another edit. Checked in a subprocess on a copy of the ssl_core package with one extra module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

from ssl_core.methods import METHOD_NAMES, METHODS, SUPPORT_MODULES, discover
from tests.conftest import REPO

TOY = textwrap.dedent('''\
    """A throwaway method for the discovery test: BYOL under another name and view recipe."""
    from ssl_core.augment import spark_views
    from ssl_core.methods import METHODS
    from ssl_core.methods.byol import BYOL


    @METHODS.register("toy")
    class Toy(BYOL):
        VIEWS = staticmethod(spark_views)
    ''')

PROBE = textwrap.dedent('''\
    import json, sys
    from ray_jobs.cli import build_parser
    from ray_jobs.study import spec
    from ray_jobs.study.chart_schema import values_study_schema
    from ssl_core.methods import METHODS, create_views
    import ssl_core
    methods = spec.schema()["properties"]["spec"]["properties"]["pretrain"]["properties"]["methods"]
    chart = values_study_schema()[0]["properties"]["spec"]["properties"]["pretrain"]["properties"]["methods"]
    study = spec.from_dict({"apiVersion": "ctssl/v1", "kind": "Study", "metadata": {"name": "t"},
                            "spec": {"storage": "/tmp/t", "pretrain": {"methods": {"toy": {}}},
                                     "data": {"pretrain": {"type": "phantom", "patients": 4, "slices": 4},
                                              "labelled": {"type": "phantom", "patients": 4, "slices": 4}}}})
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices["pretrain"]._actions
               if "--method" in a.option_strings)
    print(json.dumps({
        "package": ssl_core.__file__, "registry": METHODS.names(), "enum": methods["propertyNames"]["enum"],
        "default": sorted(methods["default"]), "chart": chart["propertyNames"]["enum"],
        "study": study.methods(), "help": sub.help, "views": len(create_views("toy", 32).pipelines)}))
    ''')


def test_the_method_list_is_the_packages_modules():
    assert tuple(sorted(METHODS.names())) == METHOD_NAMES
    assert not set(METHOD_NAMES) & SUPPORT_MODULES
    assert all(METHODS.get(m).VIEWS is not None for m in METHOD_NAMES)  # every method names its views


def test_a_new_method_module_is_found_everywhere_without_another_edit(tmp_path):
    pkg = tmp_path / "ssl_core"
    shutil.copytree(REPO / "ssl_core", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "methods" / "toy.py").write_text(TOY)
    (pkg / "methods" / "_helpers.py").write_text("X = 1\n")  # private modules are not methods
    assert discover([str(pkg / "methods")]) == tuple(sorted([*METHOD_NAMES, "toy"]))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(pkg))  # the copy with the extra module was the one imported
    want = sorted([*METHOD_NAMES, "toy"])
    assert got["registry"] == want and got["enum"] == want and got["default"] == want and got["chart"] == want
    assert got["study"] == ["toy"] and "toy" in got["help"].split(" | ")
    assert got["views"] == 1  # the spark recipe the toy class named
