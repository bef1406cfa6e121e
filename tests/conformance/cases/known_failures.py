"""Cases the server cannot pass yet, each with its reason: they run, and show as xfail.

Keyed by (test function name, sdk or pytest param id, or None for every parametrisation).
pytest runs with xfail_strict, so a case listed here that starts passing fails the suite
until its entry is removed: the list can only shrink honestly.
"""

KNOWN_FAILURES: dict[tuple[str, str | None], str] = {
    ("test_batch_events", None):
        "server: batchEvents is ignored; each event starts its own run (events=[1 event])",
    ("test_big_batch_uses_api", None):
        "server: batchEvents is ignored, so no batch is large enough to need use_api",
}
