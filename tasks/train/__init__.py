"""``subquad train``, ``eval`` and ``sample``: one training loop (``trainer.py``) for the classification,
segmentation and DiT tasks of a recipe (``config.py``), with their data sets (``data/``), resumable
checkpoints (``checkpoint.py``), fine-tuning weights (``pretrained.py``), metrics and their log."""
