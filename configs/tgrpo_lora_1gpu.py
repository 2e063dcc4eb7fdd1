# T-GRPO on Qwen2.5-VL-7B with LoRA on ONE 80 GB GPU, on top of the paper config (README: "LoRA and fewer GPUs"):
# python tgrpo.py configs/tgrpo_paper.py configs/tgrpo_lora_1gpu.py
out_dir = "out/tgrpo_lora_1gpu"
deepspeed = ""                     # one GPU: plain torch; bf16 frozen base, fp32 adapters and AdamW state
lora_rank = 64                     # adapters on q, k, v, o, gate, up, down of the language model: 162 M parameters
lora_alpha = 128
lr = 1e-5                          # LoRA usually wants about 10x full fine-tuning's lr (1e-6); not tuned here
