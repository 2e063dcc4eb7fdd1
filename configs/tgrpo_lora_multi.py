# T-GRPO on Qwen2.5-VL-7B with LoRA on 2-4 GPUs (40-80 GB), on top of the paper config (README: "LoRA and fewer GPUs"):
# torchrun --nproc_per_node 4 tgrpo.py configs/tgrpo_paper.py configs/tgrpo_lora_multi.py
out_dir = "out/tgrpo_lora_multi"
deepspeed = "configs/ds_zero2.json"  # each GPU holds the bf16 base (ZeRO-3 would gather it for every rollout anyway);
#                                      ZeRO-2 splits the adapters' fp32 master weights and Adam state
batch_size = 2                     # x 4 GPUs: the paper's 8 prompts a step (on 2 GPUs: 4, see the RESULTS.md row)
lora_rank = 64
lora_alpha = 128
lr = 1e-5                          # LoRA usually wants about 10x full fine-tuning's lr (1e-6); not tuned here
