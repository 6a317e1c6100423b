"""s2m_ext's benchmark suite: s2m_ext side by side with what users would use instead.

``python -m bench --help`` for the summary command, ``python -m bench.cuda_targets`` for the
CUDA speed targets; ``pytest bench`` runs and checks every contender once. bench/README.md
says what is measured and how.
"""
