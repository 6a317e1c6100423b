"""s2m_ext's benchmark suite: s2m_ext side by side with what users would use instead.

``python -m bench --help`` for the summary command; ``pytest bench`` for the
pytest-benchmark tests. bench/README.md says what is measured and how.
"""
