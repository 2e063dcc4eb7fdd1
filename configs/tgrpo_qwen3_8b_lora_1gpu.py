# T-GRPO on Qwen3-VL-8B with LoRA on ONE 80 GB GPU (README: "Qwen3-VL"):
# python tgrpo.py configs/tgrpo_paper.py configs/tgrpo_qwen3_8b.py configs/tgrpo_qwen3_8b_lora_1gpu.py
out_dir = "out/tgrpo_qwen3_8b_lora_1gpu"
deepspeed = ""                     # one GPU: plain torch; bf16 frozen base, fp32 adapters and AdamW state
lora_rank = 64                     # adapters on q, k, v, o, gate, up, down of the 36 text layers: 175 M
lora_alpha = 128
lr = 1e-5                          # as the 7B LoRA config; not tuned here
