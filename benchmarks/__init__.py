"""Side-by-side benchmarks: deltatune vs PEFT vs the bare backbone (``python -m benchmarks.compare``)."""
