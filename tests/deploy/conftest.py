"""Fixtures shared by the deploy tests."""

from tests.conftest import one_thread_fixture

one_thread = one_thread_fixture()
