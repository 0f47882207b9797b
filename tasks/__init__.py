"""What a user runs: the ``subquad`` command line (``cli.py``), training (``train/``), benchmarks
(``bench/``), the diffusers pipeline accelerator (``pipelines/``) and the model zoo table (``zoo.py``)."""
