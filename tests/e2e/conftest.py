"""The fhir_fails mark, and each test's outcome kept on its item (a fixture saves the page
on failure)."""

from __future__ import annotations

from collections.abc import Generator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fhir_fails(*queries): (Type, 'browser' or 'all') "
                            "searches the sandbox FHIR server answers with 500")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                        pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
