"""The tiny tokenizer of the bundled fixtures, whose vocabulary has 1024 entries (nothing may come
from a hub). Byte-level, as GPT-2's:

- ids 0-2: <unk>, <s>, </s>;
- ids 3-258: one per byte, in the order of the sorted byte-level alphabet;
- ids 259-1023: two-letter strings "aa", "ab", ..., "zz", "Aa", ..., "Dk" (765), so that every id a
  model can generate decodes to text a person can see.

It has no merges: encoding gives one id per byte of the text, as it always did (the vLLM tests
tokenize their prompts with it), and ids 259-1023 only come out of a model.

Each fixture directory tests/fixtures/modelopt/<name>/ ships tokenizer.json and tokenizer_config.json
made by write_tokenizer; regenerate them all with `python tests/vllm/tiny_tokenizer.py`."""

from __future__ import annotations

import json
import string
import sys
from itertools import islice, product
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

VOCAB_SIZE = 1024
SPECIAL = ["<unk>", "<s>", "</s>"]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "modelopt"


def vocabulary() -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    letters = product(string.ascii_lowercase + string.ascii_uppercase, string.ascii_lowercase)
    for a, b in islice(letters, VOCAB_SIZE - len(vocab)):
        vocab[a + b] = len(vocab)  # ASCII letters are their own byte-level symbols
    assert len(vocab) == VOCAB_SIZE
    return vocab


def write_tokenizer(directory: Path) -> None:
    """tokenizer.json and tokenizer_config.json, loadable by transformers' AutoTokenizer."""
    directory = Path(directory)
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary(), merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    directories = [Path(d) for d in sys.argv[1:]] or sorted(d for d in FIXTURES.iterdir() if d.is_dir())
    for d in directories:
        write_tokenizer(d)
        print(f"wrote {d}/tokenizer.json, tokenizer_config.json")
