"""`python -m lazyxform_vllm serve ./ckpt ...`: the same as the `lazyxform-vllm` command (cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.argv[0] = "python -m lazyxform_vllm"
    main()
