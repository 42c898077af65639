"""``shadowserve bench vllm``: TTFT of a cached prefix in vLLM with our connector vs without it.

The benchmark lives beside the connector (integrations/vllm/bench.py); this module only puts it
behind the common ``shadowserve bench`` command. vLLM itself is imported by its child processes.
"""

from shadowserve.integrations.vllm.bench import add_arguments, run

__all__ = ["add_arguments", "run"]
