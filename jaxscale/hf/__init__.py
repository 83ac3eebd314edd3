"""Hugging Face interop: Llama, GPT-2, Mixtral and Qwen3-MoE checkpoints (config.json +
safetensors) in and out.

`import_hf(model_dir, out)` writes a jaxscale checkpoint that `checkpoint.init_params_from`,
`jaxscale generate` and `jaxscale eval` read; `export_hf(checkpoint_dir, out)` writes a directory
that `transformers` loads. Neither imports torch or transformers. See docs/huggingface.md.
"""

from jaxscale.hf.convert import checkpoint_config, export_hf, import_config, import_hf, load_hf_params

__all__ = ["checkpoint_config", "export_hf", "import_config", "import_hf", "load_hf_params"]
