"""Write a tiny random-weight llama-architecture GGUF model for e2e tests.

The model is a real (if meaningless) llama network that llama.cpp loads and
runs in milliseconds: 2 layers, 64-dim embeddings, f32 weights, ~450 KB.

Tokenizer: SentencePiece-style ("llama") vocabulary of a few hundred pieces:
``<unk> <s> </s> <|im_start|> <|im_end|>``, the 256 byte-fallback tokens
``<0x00>..<0xFF>`` (so any UTF-8 prompt tokenizes), printable ASCII characters
and some ``▁word`` pieces. ``tokenizer.chat_template`` is the standard ChatML
template, which llama-cpp-python recognises as ``chat_format="chatml"``, so
``/v1/chat/completions`` works.

Weights are random (seeded, so the file is byte-for-byte deterministic) with
one twist that keeps the generated text readable: embedding dimension 0 is a
large constant that no layer writes to, and ``output.weight[:, 0]`` is strongly
negative for control, byte and unknown tokens. Sampling (at any temperature
>= 0) therefore only ever picks printable ASCII / word pieces — never EOS, ``<|im_end|>`` or raw bytes —
so generations always run to ``max_tokens`` (``finish_reason == "length"``)
unless a ``stop`` sequence matches, and ``content`` is never empty.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_NAME = "tiny-random-llama"
SEED = 20240601

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
N_FF = 128
CONTEXT_LENGTH = 2048

_WORD_TEXT = (
    "the of and to a in is it you that he was for on are as with his they I at be this "
    "have from or one had by word but not what all were we when your can said there use "
    "an each which she do how their if will up other about out many then them these so "
    "some her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did "
    "get come made may part hello world proxy llama token stream test"
)


def _vocab() -> tuple[list[str], list[float], list[int], int]:
    """Return (tokens, scores, token_types, n_bad) with the n_bad unsampleable first."""
    tt = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL, tt.CONTROL, tt.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [tt.BYTE] * 256
    scores: list[float] = [0.0] * len(tokens)
    n_bad = len(tokens)

    pieces: list[str] = ["▁"]
    pieces += [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII except space
    pieces += ["▁" + w for w in dict.fromkeys(_WORD_TEXT.split())]
    for piece in pieces:
        tokens.append(piece)
        types.append(tt.NORMAL)
        # SPM merges the highest-scoring pieces first: prefer longer pieces.
        scores.append(-100.0 + float(len(piece)))
    assert len(set(tokens)) == len(tokens)
    return tokens, scores, [int(t) for t in types], n_bad


def write_tiny_llama_gguf(path: Path) -> None:
    """Write the tiny deterministic llama GGUF model to ``path``."""
    tokens, scores, types, n_bad = _vocab()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD
    kv_dim = head_dim * N_HEAD_KV
    rng = np.random.default_rng(SEED)

    def rand(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    # ChatML: the end of an assistant turn is <|im_end|>.
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHATML_TEMPLATE)

    # Token embeddings: dim 0 is a constant "bias" channel, the rest random.
    embd = rand(n_vocab, N_EMBD, std=1.0)
    embd[:, 0] = 8.0
    writer.add_tensor("token_embd.weight", embd)

    for i in range(N_LAYER):
        p = f"blk.{i}."
        attn_out = rand(N_EMBD, N_EMBD, std=0.15)
        ffn_down = rand(N_EMBD, N_FF, std=0.15)
        attn_out[0, :] = 0.0  # keep the bias channel constant through the
        ffn_down[0, :] = 0.0  # residual stream
        writer.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "attn_q.weight", rand(N_EMBD, N_EMBD, std=0.3))
        writer.add_tensor(p + "attn_k.weight", rand(kv_dim, N_EMBD, std=0.3))
        writer.add_tensor(p + "attn_v.weight", rand(kv_dim, N_EMBD, std=0.3))
        writer.add_tensor(p + "attn_output.weight", attn_out)
        writer.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(p + "ffn_gate.weight", rand(N_FF, N_EMBD, std=0.3))
        writer.add_tensor(p + "ffn_up.weight", rand(N_FF, N_EMBD, std=0.3))
        writer.add_tensor(p + "ffn_down.weight", ffn_down)

    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    out = rand(n_vocab, N_EMBD, std=0.3)
    out[:, 0] = 1.0
    out[:n_bad, 0] = -3.0  # control/byte/unknown tokens: never sampled
    writer.add_tensor("output.weight", out)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama.gguf")
    write_tiny_llama_gguf(target)
    print(target)
