# T-GRPO at paper scale (DETAILS.md, "Hyperparameters"): the SFT model on Video-R1-260k, 8x A100-80GB, ZeRO-3, about 1k steps.
# torchrun --nproc_per_node 8 tgrpo.py configs/tgrpo_paper.py
init_from = "out/sft_paper"
data_dir = "data"
train_json = "data/Video-R1-260k.json"
media_root = "data"
out_dir = "out/tgrpo_paper"
max_steps = 1000
batch_size = 1                     # prompts per GPU, as in the paper; any value works
num_generations = 8
num_contrast = 4
max_new_tokens = 768
temperature = 1.0                  # rollout sampling, as the paper (the toy's default is 0.7)
max_prompt_tokens = 16384          # 16 frames x 128 tokens + the question: ~2.2k; longer is a bad record
lr = 1e-6
min_lr_ratio = 0.0                 # cosine to 0, as the official scripts
beta = 0.04
max_frames = 16                    # Video-R1 training: 16 frames at 2 fps of 128*28*28 pixels each
min_pixels = 128 * 28 * 28         # Video-R1's qwen-vl-utils scales smaller clips up, and its video cap is
max_pixels = 105369                # int(1.05 * 128*28*28) (DETAILS.md); here for images too (there 4 to 256 *28*28)
skip_bad = True
sample_interval = 20
ckpt_interval = 100
grad_ckpt = True
keep_checkpoints = 2               # the last 2 keep optimizer state (~125 GB each at 7B); older: weights only
deepspeed = "configs/ds_zero3.json"
