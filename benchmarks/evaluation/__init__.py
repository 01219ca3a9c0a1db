"""Model evaluation: test NLL, validation NLL, reconstruction and sample quality (not timings)."""
