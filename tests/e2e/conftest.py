"""The fhir_fails mark, each test's outcome kept on its item (a fixture saves the page on
failure), and the browser the end-to-end tests share (Debian's chromium, driven by Playwright;
the test modules skip themselves when either is missing)."""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from tests.e2e.sandbox import CHROMIUM_ARGS


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


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright import sync_api  # (imported here: the modules check it is installed)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()
