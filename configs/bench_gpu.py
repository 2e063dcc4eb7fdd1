# The GPU check at paper shapes (RESULTS.md, "The GPU check"): python bench.py configs/bench_gpu.py
random_7b = "full"
height = 224                       # 224 x 448 = 128*28*28 pixels a frame, the paper's training frames
width = 448
new_tokens = 768                   # the paper's max_new_tokens
repeats = 2                        # the first run warms up kernels and the allocator
grad_ckpt = True
