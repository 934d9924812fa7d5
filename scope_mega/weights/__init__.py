"""HF <-> Megatron weights, one mapping for every direction.

`mapping` (the table per architecture family and its transforms), `hf_to_megatron` (import),
`megatron_to_hf` (export), `stream_collective` (live export over the process groups), `stream_shm`
(live export to model-parallel rank 0 through shared memory), `hf_export` (a running model -> an HF
directory; a run's `checkpoint.export_hf`), `fp8_export` (a checkpoint -> modelopt's HF FP8 format),
`files` (safetensors I/O, output folders that appear only when complete), `megatron_ckpt` (reading
`torch_dist` checkpoints: into a built model with Megatron's loader, or piece by piece in one
process), `hf_prm` (the reference HF class of the Qwen2.5-Math-PRM layout).
"""
