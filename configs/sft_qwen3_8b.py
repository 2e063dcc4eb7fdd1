# SFT of Qwen3-VL-8B-Instruct on Video-R1-COT-165k, on top of the paper config (README: "Qwen3-VL"):
# torchrun --nproc_per_node 8 sft.py configs/sft_paper.py configs/sft_qwen3_8b.py
model_path = "checkpoints/Qwen3-VL-8B-Instruct"   # the family is read from its config.json
out_dir = "out/sft_qwen3_8b"
# Qwen3-VL's qwen-vl-utils rule in 32-px tokens (DETAILS.md, "Frame sampling and resizing"):
min_pixels = 128 * 32 * 32         # the reference's floor, 128 tokens, as the paper's frames
max_pixels = 256 * 32 * 32         # the paper's image cap (and eval frame), here a short clip's too
total_pixels = 1024 * 32 * 32      # the paper's clip: 16 frames, 128 tokens per temporal patch
