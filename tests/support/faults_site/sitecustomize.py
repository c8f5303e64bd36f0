"""Started by Python in every process with this folder on PYTHONPATH (the tests' Snakemake runs): when
ROUTELAB_INJECT_FAULT is set, give routelab's route job the fault injector of tests/faults.py as soon as
``routelab.run.route`` is imported (nothing is imported before that)."""

import importlib.abc
import importlib.util
import os
import sys

TARGET = "routelab.run.route"


class _InjectFaults(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            import faults

            faults.patch_module(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("ROUTELAB_INJECT_FAULT"):
    sys.meta_path.insert(0, _InjectFaults())
