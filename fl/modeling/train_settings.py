"""What one local fine-tuning is asked to do (fl.modeling.training), without importing torch.

The command line builds these settings (fl.run.config) and its ``--help`` must not pay for torch or
transformers, so the settings and the schedule names live here, apart from the training code.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("linear", "constant")  # the learning-rate schedules fl.modeling.training.lr_factor knows


@dataclass(frozen=True)
class TrainSettings:
    steps: int  # optimizer steps per domain
    batch_size: int = 16
    lr: float = 1e-4  # encoder learning rate
    head_lr: float = 1e-3  # heads start from probes; they need to move faster than the encoder
    weight_decay: float = 0.01
    proximal_mu: float = 0.0  # FedProx; 0 = plain local SGD
    freeze_word_embeddings: bool = True  # 11.7M of 22.7M MiniLM weights; frozen is faster and merges cleanly
    schedule: str = "linear"  # 'linear': 10% warm-up then linear decay to 0 within each call; 'constant'
