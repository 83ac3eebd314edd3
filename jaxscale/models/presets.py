"""Published model shapes, as `model` config fields."""

LLAMA3_COMMON = dict(vocab_size=128256, n_kv_heads=8, max_seq_len=8192, rope_theta=500000.0)

LLAMA3 = {
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, head_dim=64, d_ff=8192,
               tie_embeddings=True),  # Llama-3.2-1B
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, head_dim=128, d_ff=14336,
               tie_embeddings=False),
    "70b": dict(d_model=8192, n_layers=80, n_heads=64, head_dim=128, d_ff=28672,
                tie_embeddings=False),
}


def llama3(size: str) -> dict:
    """Model fields of a Llama-3 size: "1b", "8b" or "70b"."""
    return {**LLAMA3_COMMON, **LLAMA3[size]}
