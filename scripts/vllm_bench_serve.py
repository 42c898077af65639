"""``vllm bench serve`` without the ``vllm`` console script, whose start-up looks up the package's
metadata (absent from some CPU/source installs: PackageNotFoundError). Same flags, same output:

    python scripts/vllm_bench_serve.py --backend openai --base-url http://127.0.0.1:8000 \\
        --model tiny-random --tokenizer DIR --dataset-name prefix_repetition ...
"""

from __future__ import annotations

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
