"""Model shapes the GPU tests share, as dotted overrides of examples/tiny_cpu.yaml."""

ONE_B = [  # a 1.1B Llama (TinyLlama's shape) on the Countdown task, random weights, bf16
    "model.hf_config.hidden_size=2048",
    "model.hf_config.intermediate_size=5632",
    "model.hf_config.num_hidden_layers=22",
    "model.hf_config.num_attention_heads=32",
    "model.hf_config.num_key_value_heads=4",
    "model.hf_config.max_position_embeddings=2048",
    "model.params_dtype=bfloat16",
]
