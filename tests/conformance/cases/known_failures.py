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
    ("test_bad_app_run_fails_clearly", "badjson200"):
        "server: a 200 with X-Inngest-SDK but a non-JSON body completes the run, output = raw text",
    ("test_sync_in_band", None):
        "server: the sync PUT (cairn dev -u) never asks for in-band sync (no X-Inngest-Sync-Kind: in_band)",
}
