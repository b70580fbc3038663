"""``sender/__init__.py`` is the curated public face: only re-exports, nothing private."""

from __future__ import annotations

import types

import sender


def test_every_name_in_all_resolves():
    missing = [name for name in sender.__all__ if not hasattr(sender, name)]
    assert missing == []


def test_no_private_name_is_exported():
    assert [name for name in sender.__all__ if name.startswith("_")] == []


def test_all_lists_each_name_once():
    assert len(sender.__all__) == len(set(sender.__all__))


def test_star_import_gives_exactly_all():
    ns: dict = {}
    exec("from sender import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == sorted(sender.__all__)


def test_public_attributes_are_all_listed():
    # Anything public on the package that is not a submodule must be in __all__ (or be the
    # version string), so nothing becomes API by accident.
    public = {name for name, value in vars(sender).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public - set(sender.__all__) == set()


def test_exports_are_the_real_objects_from_their_modules():
    for name in sender.__all__:
        obj = getattr(sender, name)
        module = getattr(obj, "__module__", "")
        # "sender" itself is fine too, should __module__ be rewritten as trio does.
        assert module == "sender" or module.startswith("sender."), (name, module)
        assert getattr(__import__(module, fromlist=[name]), name) is obj
