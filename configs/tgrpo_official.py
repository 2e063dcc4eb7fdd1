# The official code's choices where it departs from the paper (DETAILS.md, "Paper vs official code"); combine with tgrpo_paper.py:
# torchrun --nproc_per_node 8 tgrpo.py configs/tgrpo_paper.py configs/tgrpo_official.py
temporal_rule = "official"         # p, p~ = mean raw accuracy
mu = 0.8                           # p >= 0.8 * p~
correct_threshold = 0.1            # correct = accuracy > 0.1 (the official rule compares strictly)
length_bonus = True
length_rule = "official"           # +0.2 for correct 320-512-token responses when >= 2 of the group are correct
num_iterations = 1                 # ratio == 1: the clip is inert
loss_norm = "sequence"
