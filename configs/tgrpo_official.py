# The official code's choices where it departs from the paper (SPEC.md's table); combine with tgrpo_paper.py:
# torchrun --nproc_per_node 8 tgrpo.py configs/tgrpo_paper.py configs/tgrpo_official.py
temporal_rule = "official"         # mean raw accuracy, mu 0.8, correct = accuracy > 0.1
length_bonus = True
length_rule = "official"           # +0.2 for correct 320-512-token responses when >= 2 of the group are correct
num_iterations = 1                 # ratio == 1: the clip is inert
loss_norm = "sequence"
