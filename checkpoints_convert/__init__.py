"""HF <-> Megatron checkpoint conversion as a standalone entry point (`python -m checkpoints_convert`),
for Slurm jobs; the implementation is `scope_mega.convert` on top of `scope_mega.weights`."""
