import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
# one toy-lab build shared by every test that needs it (and by `make demo`): the default user cache
os.environ.setdefault("OPD_TOY_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "opd_callback", "toy"))

import torch  # noqa: E402

# tiny models on a shared 2-core machine: one thread is several times faster than two (no contention)
torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers`
