from model_formats.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer, build_tiny_t5_tokenizer


def test_clip_tokenizer_matches_the_published_vocabulary():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    # Ids every SD user has seen: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    padded = build_clip_tokenizer(pad_token="!")("cat", padding="max_length", max_length=8).input_ids
    assert padded[-1] == 0  # "!" is id 0, SDXL's second tokenizer pads with it


def test_tiny_t5_tokenizer_ends_with_eos():
    tokenizer = build_tiny_t5_tokenizer()
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 0
