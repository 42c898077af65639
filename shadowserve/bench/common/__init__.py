"""What the suites share: drivers, the harness, metrics, plots, workloads, codec flags, machine info.

Nothing here imports a suite."""
