# Evaluation at paper settings (Video-R1's eval: qwen-vl-utils with 256*28*28 pixels a frame, 1024 new tokens).
# torchrun --nproc_per_node 8 eval.py configs/eval_paper.py --model_path=out/tgrpo_paper --data=eval/mvbench.json
max_frames = 16                    # the paper reports 16, 32 and 64 (--max_frames=64: ~8k vision tokens a prompt)
min_pixels = 128 * 28 * 28         # smaller clips are scaled up, as Video-R1's qwen-vl-utils does
max_pixels = 256 * 28 * 28
max_new_tokens = 1024
