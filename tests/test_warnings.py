"""
setup.cfg's filterwarnings turns a warning from TickStock's own code (or its
tests) into an error, so a new one fails the suite, while other packages' warnings are only
reported. Its module field is a regex matched against the name of the module
that issued the warning; these tests check it matches TickStock's modules and
nothing else.
"""

from __future__ import annotations

import warnings

import pytest


def warn_from(module: str) -> None:
    """Issue a DeprecationWarning as code of C{module} does (warnings names the caller's module)."""
    exec("import warnings\nwarnings.warn('deprecated', DeprecationWarning)", {"__name__": module})


@pytest.mark.parametrize("module", [
    "tickstock", "tickstock.events", "tickstock.web.api", "twisted.plugins.tickstock_plugin",
    "tests.test_api",
])
def test_a_warning_from_tickstock_code_fails_the_test(module: str) -> None:
    with pytest.raises(DeprecationWarning, match="deprecated"):
        warn_from(module)


@pytest.mark.parametrize("module", [
    "twisted.web.client", "tickstock_extras", "tests_extra", "twisted.plugins.other",
])
def test_a_warning_from_other_code_is_only_reported(module: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warn_from(module)
    assert [str(warning.message) for warning in caught] == ["deprecated"]
