"""Test harness for the official-SDK conformance suite: processes, signing, fake servers."""
