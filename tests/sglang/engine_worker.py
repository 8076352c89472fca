"""One sglang.Engine (on the CPU unless the request names another device), in a process of its own (SGLang spawns its scheduler; a failed engine
dies with this process):

    python engine_worker.py REQUEST.json RESULT.pt

The request names the checkpoint, extra sglang.Engine arguments, the prompts' token ids and the checkpoint weights to read back from
the loaded model (SGLang's get_weights_by_name: after loading, the portable scheme's decoded weight,
one fused member at a time). The result holds full-vocabulary prompt log-probabilities, [sum(len - 1),
VOCAB] (row i: the distribution of token i + 1 of its prompt), and those weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

VOCAB = 1024


def main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    device = request.get("device", "cpu")  # benchmarks/gpu_sglang.py asks for cuda
    if device == "cpu":
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    import sglang

    defaults = {"dtype": "bfloat16", "max_total_tokens": 1024, "disable_cuda_graph": True, "log_level": "info", "random_seed": 0}
    engine = sglang.Engine(model_path=request["model"], device=device, **{**defaults, **request["engine"]})
    try:
        rows = []
        for ids in request["ids"]:
            out = engine.generate(
                input_ids=ids,
                sampling_params={"max_new_tokens": 1, "temperature": 0},
                return_logprob=True,
                logprob_start_len=0,
                top_logprobs_num=VOCAB,
            )
            for position in out["meta_info"]["input_top_logprobs"][1:]:
                row = torch.full((VOCAB,), torch.nan)
                for logprob, token, _ in position:
                    row[token] = logprob
                rows.append(row)
        weights = {n: torch.tensor(engine.get_weights_by_name(n, truncate_size=1 << 30)) for n in request["weights"]}
    finally:
        engine.shutdown()
    torch.save({"logprobs": torch.stack(rows), "weights": weights}, result_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
