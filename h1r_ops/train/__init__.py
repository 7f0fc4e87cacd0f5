"""h1r_ops.train: the two-stage recipe of Falcon-H1R (SFT on packed reasoning traces, then GRPO with
verifiable rewards) on the native model and the fused ops, data-parallel over torch.distributed.

Modules: ``tasks`` (demo math problems, char tokenizer, packing), ``losses`` (the SFT / GRPO math),
``sft`` (optimizer, schedule, checkpoints, SFTTrainer), ``grpo`` (RolloutBackend, EngineRolloutBackend,
GRPOTrainer), ``verifier`` (\\boxed{} rewards), ``dist`` (data parallelism, FSDP2), ``cli``
(``h1r train sft|grpo|demo``), ``demo`` (the end-to-end demo and its evidence files).
"""

from .grpo import (EngineRolloutBackend, GRPOConfig, GRPOTrainer, ModelRolloutBackend, RolloutBackend,  # noqa: F401
                   Sample)
from .losses import grpo_advantages, grpo_token_losses, ppo_clip_token_loss, truncated_is_weights  # noqa: F401
from .sft import OptimConfig, SFTTrainer, Trainer, evaluate_greedy, warmup_cosine  # noqa: F401
from .tasks import CharTokenizer, PackedBatcher, ProblemStream, heldout_problems, make_problem  # noqa: F401
from .verifier import boxed_reward, extract_boxed  # noqa: F401
