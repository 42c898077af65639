"""The serving engine: requests, scheduling, paged KV memory, and the step loop."""
