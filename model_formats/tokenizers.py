"""Build real tokenizers without a model hub.

CLIP's byte-level BPE merges ship inside the ``open_clip_torch`` wheel; from them we
rebuild the exact 49,408-token vocabulary every Stable Diffusion-era CLIP text encoder uses.
T5 needs a SentencePiece-style Unigram model; for tiny test models we train one in
code on a handful of sentences (real class, real algorithm, small vocabulary).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
_CLIP_MERGE_COUNT = CLIP_VOCAB_SIZE - 256 * 2 - 2


def _byte_to_unicode_table() -> dict[int, str]:
    """Map each byte to a printable unicode character (the GPT-2/CLIP convention)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


def find_clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The CLIP vocabulary file ships with open_clip_torch; install it with "
            "`pip install --no-deps open_clip_torch`."
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP vocabulary file not found at {path}")
    return path


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(find_clip_bpe_file().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _CLIP_MERGE_COUNT + 1]]
    symbols = list(_byte_to_unicode_table().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(*, pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer; some pipelines' second tokenizer pads with "!" instead."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)


_T5_TRAINING_TEXT = [
    "a photo of a cat sitting on a red chair",
    "a portrait of a woman with long hair, studio lighting",
    "a landscape with mountains, a lake and a forest at sunset",
    "an oil painting of a city street at night in the rain",
    "a close-up photograph of a dog running on the beach",
    "a watercolor illustration of flowers in a blue vase",
    "the quick brown fox jumps over the lazy dog",
    "a man wearing a black jacket standing in front of a building",
]


def build_tiny_t5_tokenizer(*, vocab_size: int = 200):
    """A small Unigram T5 tokenizer trained in code (for tiny random test models only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    raw = Tokenizer(models.Unigram())
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.train_from_iterator(_T5_TRAINING_TEXT, trainer=trainer)
    vocab = [tuple(entry) for entry in json.loads(raw.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_bart_tokenizer(*, vocab_size: int = 300):
    """A small byte-level BPE BART tokenizer trained in code, with Florence-2's image token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(
        _T5_TRAINING_TEXT,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    model = json.loads(trainer._tokenizer.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return BartTokenizer(vocab=model["vocab"], merges=merges, extra_special_tokens={"image_token": "<image>"})
