"""HF <-> Megatron weights, one mapping for every direction.

`mapping` (the table per architecture family and its transforms), `hf_to_megatron` (import),
`megatron_to_hf` (export), `streaming` (live export to a rollout engine), `files` (safetensors I/O,
output folders that appear only when complete), `megatron_ckpt` (reading `torch_dist` checkpoints
piece by piece), `hf_prm` (the reference HF class of the Qwen2.5-Math-PRM layout).
"""
