import os

# Tests never reach a model hub: every model is built from a tiny config or shipped in the repo.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars off in tests (and in the processes they launch)
