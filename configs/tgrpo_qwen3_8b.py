# T-GRPO on Qwen3-VL-8B, full fine-tuning, on top of the paper config (README: "Qwen3-VL"):
# torchrun --nproc_per_node 8 tgrpo.py configs/tgrpo_paper.py configs/tgrpo_qwen3_8b.py    # ZeRO-3, 8 GPUs
# python tgrpo.py configs/tgrpo_paper.py configs/tgrpo_qwen3_8b.py \
#     --deepspeed=configs/ds_zero3_offload.json                                            # one GPU, offload
init_from = "out/sft_qwen3_8b"     # the family is read from the checkpoint's config.json
out_dir = "out/tgrpo_qwen3_8b"
# Qwen3-VL's qwen-vl-utils rule in 32-px tokens (DETAILS.md, "Frame sampling and resizing"):
min_pixels = 128 * 32 * 32         # the reference's floor, 128 tokens, as the paper's frames
max_pixels = 256 * 32 * 32         # the paper's image cap (and eval frame), here a short clip's too
total_pixels = 1024 * 32 * 32      # the paper's clip: 16 frames, 128 tokens per temporal patch
# the contrast clip: frames shuffled under timestamps in time order (DETAILS.md)
contrast_timestamps = "ordered"
