# SFT cold start at paper scale (DETAILS.md, "Hyperparameters"): Qwen2.5-VL-7B-Instruct on Video-R1-COT-165k, 8x A100-80GB, ZeRO-2.
# torchrun --nproc_per_node 8 sft.py configs/sft_paper.py
model_path = "checkpoints/Qwen2.5-VL-7B-Instruct"  # a local HF folder (no hub access at run time)
data_dir = "data"
train_json = "data/Video-R1-COT-165k.json"
media_root = "data"                # record paths are relative to the dataset root
val_records = 512
out_dir = "out/sft_paper"
max_steps = 10300                  # one epoch: 165k records / (8 GPUs x 1 x grad_accum 2)
batch_size = 1
grad_accum = 2
lr = 1e-6
warmup_steps = 100
min_lr_ratio = 0.0
max_frames = 16                    # Video-R1 training: 16 frames at 2 fps of 128*28*28 pixels each
min_pixels = 128 * 28 * 28         # Video-R1's qwen-vl-utils scales smaller clips up, and its video cap is
max_pixels = 105369                # int(1.05 * 128*28*28) (DETAILS.md); here for images too (there 4 to 256 *28*28)
max_prompt_tokens = 16384          # 16 frames x 128 tokens + the question: ~2.2k; longer is a bad record
skip_bad = True                    # a 165k-record run goes on past a broken clip; skips are counted in the log
eval_interval = 500
ckpt_interval = 1000
log_interval = 10
grad_ckpt = True
keep_checkpoints = 2               # the last 2 keep optimizer state (~125 GB each at 7B); older: weights only
deepspeed = "configs/ds_zero2.json"
