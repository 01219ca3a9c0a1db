"""Stress: bundle fuzzing, the multi-threaded soak and the browser check of `vaeinfer serve`."""
