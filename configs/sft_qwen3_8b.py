# SFT of Qwen3-VL-8B-Instruct on Video-R1-COT-165k, on top of the paper config (README: "Qwen3-VL"):
# torchrun --nproc_per_node 8 sft.py configs/sft_paper.py configs/sft_qwen3_8b.py
model_path = "checkpoints/Qwen3-VL-8B-Instruct"   # the family is read from its config.json
out_dir = "out/sft_qwen3_8b"
# the paper's token budget in Qwen3-VL's 32-px tokens: 128 tokens per temporal patch of 2 frames
min_pixels = 128 * 32 * 32
max_pixels = 128 * 32 * 32
