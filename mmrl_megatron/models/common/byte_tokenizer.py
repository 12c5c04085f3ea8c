"""A byte-level tokenizer for the tiny test checkpoints, built in code because nothing can be downloaded.

Ids 0..255 are the 256 byte symbols (BPE without merges, so any text round-trips and ids are stable);
special token i has id 256 + i, fixed by construction, so a family's tiny config can name its special
ids as constants.
"""
from typing import Optional, Sequence

BYTE_TOKENS = 256


def special_token_id(special_tokens: Sequence[str], token: str) -> int:
    """The id byte_level_tokenizer gives `token` among `special_tokens`."""
    return BYTE_TOKENS + list(special_tokens).index(token)


def byte_level_tokenizer(special_tokens: Sequence[str], chat_template: str, eos_token: str, pad_token: str,
                         bos_token: Optional[str] = None):
    """A PreTrainedTokenizerFast: byte symbols, then `special_tokens` (never split, skipped when decoding with
    skip_special_tokens), with the given chat template and eos/pad/bos tokens (each one of `special_tokens`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({token: special_token_id(special_tokens, token) for token in special_tokens})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos_token, pad_token=pad_token,
                                        bos_token=bos_token, additional_special_tokens=list(special_tokens))
    tokenizer.chat_template = chat_template
    return tokenizer
