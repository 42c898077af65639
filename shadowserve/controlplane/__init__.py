"""The control plane: beside the scheduler, it looks up cached prefixes and runs the fetching queue."""
