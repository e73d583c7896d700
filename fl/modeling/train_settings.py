"""What one local fine-tuning is asked to do (fl.modeling.training), and the shape of LoRA adapters (fl.modeling.lora),
without importing torch.

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
    freeze_lora_a: bool = False  # a model with LoRA adapters trains B only (FFA-LoRA: the merge rule ffa asks for it)


@dataclass(frozen=True)
class LoraSettings:
    """One adapter per target module of the encoder; its update is ``alpha / rank * B @ A``."""

    rank: int = 8  # FlowerTune's encoder recipes and the LoRA paper's GLUE runs use 8
    alpha: float = 16.0  # scale alpha / rank = 2, as those recipes
    dropout: float = 0.05  # on the adapter's input only
    targets: tuple[str, ...] = ()  # () = the attention's query and value (PEFT's default for BERT-like encoders)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank
