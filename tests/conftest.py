import pytest


@pytest.fixture(autouse=True)
def _stable_terminal(monkeypatch):
    """Stable table output: no colour, a fixed width, no debug tracebacks."""
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("STABLEDRL_DEBUG", raising=False)
