"""The public surface: what `__all__` names exists (after trio's test_exports)."""

from __future__ import annotations

import importlib

import pytest

import pyvhost

SUBPACKAGES = ["pyvhost.memory", "pyvhost.ring", "pyvhost.protocol", "pyvhost.daemon",
               "pyvhost.devices.net", "pyvhost.devices.rng", "pyvhost.testing", "pyvhost.bench",
               "pyvhost.device"]


def test_top_level_names_resolve():
    for name in pyvhost.__all__:
        assert getattr(pyvhost, name) is not None
    assert issubclass(pyvhost.Device, object) and pyvhost.Request.__slots__


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} says nothing about what is public"
    for name in module.__all__:
        if not hasattr(module, name):  # a public submodule
            importlib.import_module(f"{package}.{name}")
