# The GPU check at Qwen3-VL-8B's shapes, on top of configs/bench_gpu.py (RESULTS.md, "The GPU check"):
# python bench.py configs/bench_gpu.py configs/bench_gpu_qwen3.py
random_7b = "qwen3_8b"
height = 256                       # 256 x 512 = 128*32*32 pixels a frame: 128 tokens per temporal
width = 512                        # patch, the token budget of the Qwen2.5-VL check's 224 x 448
