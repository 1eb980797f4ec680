"""Paths that moved out of ``callbacks`` (which holds only Lightning callbacks) still import, with a warning."""

import importlib
import sys

import pytest


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("callbacks.plots", "cppo_lightning.plots", "plot_runs"),
        ("callbacks.audit_report", "cppo_lightning.audit.report", "write_audit_report"),
    ],
)
def test_moved_modules_warn_and_give_the_same_functions(monkeypatch, old, new, name):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_plot_functions_from_the_callbacks_package_warn():
    import callbacks
    from cppo_lightning import plots

    with pytest.warns(DeprecationWarning, match="callbacks.plot_runs moved to cppo_lightning.plots"):
        assert callbacks.plot_runs is plots.plot_runs
    with pytest.raises(AttributeError):
        callbacks.no_such_name  # noqa: B018
