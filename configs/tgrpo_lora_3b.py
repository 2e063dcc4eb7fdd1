# T-GRPO on Qwen2.5-VL-3B with LoRA on ONE 24-48 GB GPU, on top of the paper config (README: "LoRA and fewer GPUs"):
# python tgrpo.py configs/tgrpo_paper.py configs/tgrpo_lora_3b.py
# The 3B model straight from its Instruct checkpoint; an SFT of it first (LoRA fits there too):
# python sft.py configs/sft_paper.py --model_path=checkpoints/Qwen2.5-VL-3B-Instruct --out_dir=out/sft_3b \
#   --deepspeed= --lora_rank=64 --lora_alpha=128 --lr=1e-5   and then --init_from=out/sft_3b here
init_from = "checkpoints/Qwen2.5-VL-3B-Instruct"
out_dir = "out/tgrpo_lora_3b"
deepspeed = ""                     # one GPU: plain torch; bf16 frozen base, fp32 adapters and AdamW state
lora_rank = 64                     # 120 M adapter parameters
lora_alpha = 128
lr = 1e-5                          # not tuned here
