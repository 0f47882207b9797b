"""Data of the training tasks: ImageFolder / Hugging Face classification sets, ADE20K and its transforms,
the synthetic shapes generated in code, and the resumable, reproducible sample order."""
